"""The memory planner on real workspaces converted from tiny random models (and SmolLM2, slow)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from converter.convert import ConvertOptions, convert
from formats.errors import TpDeployError
from formats.manifest import load_manifest
from runtime.config import CacheConfig, parse_size
from runtime.serve.plan import MemoryPlan, format_table, plan_memory
from runtime.serve.plan_png import draw
from runtime.worker.memory import ALLOCATOR_SLACK, GIB, kv_bytes, reserve_bytes, weights_bytes
from tests.fixtures.int4_pack import make_tiny_awq
from tests.fixtures.tiny import make_tiny

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Quantized KV against fp16 at head_dim 64 (docs/kv-cache.md): 128 / 68 and 128 / 36 bytes per token-head.
# A budget of ~1 GiB is ~8k blocks, so rounding down to whole blocks moves the ratio by < 0.001.
RATIO_TOL = 0.01


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Factory: ``workspace(tp, **make_tiny kwargs)`` converts a tiny random model once per module."""
    built: dict[tuple, Path] = {}

    def build(tp: int, maker=make_tiny, **kw) -> Path:
        key = (tp, maker.__name__, tuple(sorted(kw.items())))
        if key not in built:
            root = tmp_path_factory.mktemp("plan")
            convert(ConvertOptions(maker(root / "src", **kw), root / "ws", tp))
            built[key] = root / "ws"
        return built[key]

    return build


def _stored_bytes(ws: Path, rank: int) -> int:
    """Tensor bytes of one rank's safetensors files, read with the reference library."""
    total = 0
    for f in load_manifest(ws).ranks[rank].files:
        with safe_open(ws / f.path, "pt") as sf:
            total += sum(sf.get_tensor(k).numel() * sf.get_tensor(k).element_size() for k in sf.keys())
    return total


@pytest.mark.parametrize("tp", [1, 2, 4], ids=lambda t: f"tp{t}")
def test_weights_bytes_equal_the_shard_bytes(workspace, tp):
    ws = workspace(tp, vocab=301)  # 301 is padded to a multiple of tp: the zero rows count too
    manifest = load_manifest(ws)
    for rank in range(tp):
        assert weights_bytes(manifest, rank, torch.float32) == _stored_bytes(ws, rank), f"rank {rank}"


def test_bf16_weights_planned_in_fp32_take_twice_the_memory(workspace):
    ws = workspace(2, dtype=torch.bfloat16)
    manifest = load_manifest(ws)
    for rank in range(2):
        stored = _stored_bytes(ws, rank)
        assert weights_bytes(manifest, rank, torch.bfloat16) == stored
        assert weights_bytes(manifest, rank, torch.float32) == 2 * stored


def test_int4_parts_keep_their_dtype(workspace):
    ws = workspace(2, maker=make_tiny_awq, num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=264)
    manifest = load_manifest(ws)
    assert manifest.weights.quantization is not None
    for rank in range(2):
        entry = manifest.ranks[rank]
        dense = sum(math.prod(t.shape) * 2 for t in entry.tensors if t.dtype == "float16" and not t.name.endswith("scales"))
        assert weights_bytes(manifest, rank, torch.float16) == _stored_bytes(ws, rank)
        # fp32 compute: only the dense fp16 tensors double; qweight, zeros and fp16 scales stay as stored.
        assert weights_bytes(manifest, rank, torch.float32) == _stored_bytes(ws, rank) + dense


MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [1]}


@pytest.mark.parametrize("arch,tie", [("llama", False), ("mistral", True), ("qwen2", False), ("qwen3", False),
                                      ("qwen3_moe", False)], ids=str)
def test_parameter_count_matches_the_checkpoint(tmp_path, arch, tie):
    """Every tensor of the checkpoint counted once; a mixture of experts also states the parameters one token
    runs through (6 of its 8 experts skipped in each of its 1 MoE layer here)."""
    src = make_tiny(tmp_path / "src", arch, tie=tie, vocab=301, extra_config=MOE if arch == "qwen3_moe" else None)
    convert(ConvertOptions(src, tmp_path / "ws", 1))
    with safe_open(src / "model.safetensors", "pt") as sf:
        expected = sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    plan = plan_memory(load_manifest(tmp_path / "ws"), gpu_mem=GIB, cache=CacheConfig(), compute_dtype=torch.float32)
    assert plan.model.parameters == expected
    skipped = 6 * 3 * 64 * 32 if arch == "qwen3_moe" else None  # experts x (gate, up, down) x hidden x I
    assert plan.model.active_parameters == (None if skipped is None else expected - skipped)
    if skipped:
        assert f"({(expected - skipped) / 1e6:,.1f}M active per token)" in format_table(plan)


def test_kv_bytes_formula():
    assert kv_bytes(1000, 200, 0.8) == 640
    assert kv_bytes(1001, 0, 0.5) == 500  # floored
    assert kv_bytes(100, 200, 0.9) == 0  # never negative


def test_reserve_by_hand(workspace):
    cfg = load_manifest(workspace(2)).model  # hidden 64, 4 heads of 16, 2 KV heads, intermediate 96, vocab 250
    per_token = 2 * 64 + (2 + 2 * 1) * 16 + 2 * 16 + 2 * 48 + 48  # residual+x, qkv, attn out, gate_up, silu*up
    logits = 64 * 125 * 4  # 64 rows of this rank's 125-entry vocab slice in fp32
    expected = 2048 * per_token * 2 + logits + ALLOCATOR_SLACK
    assert reserve_bytes(cfg, 2, torch.float16, 2048, 64, rank=1) == expected
    assert reserve_bytes(cfg, 2, torch.float16, 2048, 64, rank=0) == expected + 64 * 250 * 4  # gathered logits
    assert reserve_bytes(cfg, 2, torch.float16, 16, 64, rank=1) == 64 * per_token * 2 + logits + ALLOCATOR_SLACK


def test_lambda_formula_by_hand(workspace):
    manifest = load_manifest(workspace(1))
    cache = CacheConfig(kv_dtype="auto", cache_max_entry_count=0.5)
    plan = plan_memory(manifest, gpu_mem=GIB, cache=cache, compute_dtype=torch.float32, max_model_len=128)
    w = weights_bytes(manifest, 0, torch.float32)
    res = reserve_bytes(manifest.model, 1, torch.float32, 2048, 64)
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 64  # K+V × layers × KV heads × head_dim × fp32 × block
    blocks = math.floor(0.5 * (GIB - w - res)) // bytes_per_block
    r = plan.ranks[0]
    assert (r.weights, r.reserve, r.kv_blocks) == (w, res, blocks)
    assert plan.num_blocks == blocks and plan.kv_tokens == blocks * 64
    assert plan.bytes_per_token == bytes_per_block // 64
    assert r.unused == GIB - w - res - blocks * bytes_per_block
    assert plan.max_concurrency == blocks * 64 // 128 and plan.concurrency == blocks * 64 / 128
    assert plan.kv_source == "cache_max_entry_count" and plan.warnings == ()


@pytest.mark.parametrize("kv_heads,tp", [(2, 2), (1, 2), (2, 4)], ids=["split", "replicated-kv1-tp2", "replicated-kv2-tp4"])
def test_ranks_agree_on_the_smallest_cache(workspace, kv_heads, tp):
    manifest = load_manifest(workspace(tp, kv_heads=kv_heads))
    plan = plan_memory(manifest, gpu_mem=GIB // 2, cache=CacheConfig(kv_dtype="fp16"), compute_dtype=torch.float16)
    per_rank_heads = max(1, kv_heads // tp)  # replicated heads: every rank stores a whole KV head
    assert plan.bytes_per_token == 2 * 2 * per_rank_heads * 16 * 2
    assert plan.num_blocks == min(r.kv_blocks for r in plan.ranks)
    assert plan.ranks[plan.limiting_rank].kv_blocks == plan.num_blocks
    assert plan.limiting_rank == 0  # equal shards; rank 0 also holds the gathered logits
    for r in plan.ranks:
        assert r.kv_allocated == plan.num_blocks * plan.block_size * plan.bytes_per_token
        assert r.weights + r.reserve + r.kv_allocated + r.unused == r.total and r.unused >= 0


def test_kv_cache_tokens_replace_lambda(workspace):
    manifest = load_manifest(workspace(2))
    plans = [plan_memory(manifest, gpu_mem=mem, cache=CacheConfig(kv_cache_tokens=1000, cache_max_entry_count=0.3),
                         compute_dtype=torch.float32, max_model_len=512) for mem in (GIB, 2 * GIB)]
    for plan in plans:
        assert plan.kv_source == "kv_cache_tokens" and plan.num_blocks == 16 and plan.kv_tokens == 1024
        assert plan.max_concurrency == 2
        assert "--kv-cache-tokens 1,000 rounded up to 16 blocks" in format_table(plan)
    assert plans[1].ranks[0].unused - plans[0].ranks[0].unused == GIB  # more memory only adds unused
    with pytest.raises(TpDeployError, match=r"--kv-cache-tokens 100000000 .* ask for at most"):
        plan_memory(manifest, gpu_mem=GIB, cache=CacheConfig(kv_cache_tokens=10 ** 8), compute_dtype=torch.float32)


def test_quantized_kv_holds_more_tokens_at_head_dim_64(workspace):
    manifest = load_manifest(workspace(1, hidden=256, heads=4, kv_heads=2))
    assert manifest.model.head_dim == 64
    tokens = {kv: plan_memory(manifest, gpu_mem=2 * GIB, cache=CacheConfig(kv_dtype=kv),
                              compute_dtype=torch.float16).kv_tokens for kv in ("fp16", "int8", "int4")}
    assert tokens["int8"] / tokens["fp16"] == pytest.approx(128 / 68, abs=RATIO_TOL)  # 1.88
    assert tokens["int4"] / tokens["fp16"] == pytest.approx(128 / 36, abs=RATIO_TOL)  # 3.56


def test_int4_plan_counts_channel_params_per_block_and_the_tails(workspace):
    manifest = load_manifest(workspace(1, hidden=512, heads=4, kv_heads=2))  # head_dim 128
    plan = plan_memory(manifest, gpu_mem=2 * GIB, cache=CacheConfig(kv_dtype="int4"), compute_dtype=torch.float16,
                       max_batch_size=8)
    layers = manifest.model.num_layers
    assert plan.bytes_per_token == layers * 2 * (64 + 8 + 64 + 4)  # K: codes + 128 channels × 4 B / 64 tokens
    tails = (8 + 1) * layers * 2 * 64 * 128 * 2  # 9 sequences' fp16 partial blocks of keys
    assert plan.kv_tail_bytes == tails
    no_tails = plan_memory(manifest, gpu_mem=2 * GIB, cache=CacheConfig(kv_dtype="int8"),
                           compute_dtype=torch.float16, max_batch_size=8)
    assert plan.ranks[0].reserve - no_tails.ranks[0].reserve == tails
    text = format_table(plan)
    assert "2 KV heads/rank × (K 72 + V 68) bytes (int4, head_dim 128)" in text and "for 9 sequences" in text


def test_gpu_mem_too_small_names_rank_and_remedies(workspace):
    manifest = load_manifest(workspace(2))
    with pytest.raises(TpDeployError, match=r"rank 0 needs .* GiB .*--gpu-mem 0\.10 GiB.*larger --tp.*int4.*"
                                            r"--max-prefill-tokens \(now 2048\)"):
        plan_memory(manifest, gpu_mem=GIB // 10, cache=CacheConfig(), compute_dtype=torch.float32)


def test_cache_smaller_than_one_request_is_a_warning(workspace):
    manifest = load_manifest(workspace(1))
    floor = weights_bytes(manifest, 0, torch.float32) + reserve_bytes(manifest.model, 1, torch.float32, 2048, 64)
    plan = plan_memory(manifest, gpu_mem=floor + (1 << 20), cache=CacheConfig(), compute_dtype=torch.float32,
                       max_model_len=1 << 20)
    assert plan.max_concurrency == 0 and len(plan.warnings) == 1
    assert "less than one 1,048,576-token request" in plan.warnings[0]
    assert "warning: the KV cache holds" in format_table(plan)


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 << 30), ("24GB", 24 * 10 ** 9), ("24000MiB", 24000 << 20), ("80g", 80 << 30),
    ("123456", 123456), (" 1.5 gib ", 3 << 29), ("512k", 512 << 10), ("2TB", 2 * 10 ** 12), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "24XB", "-5GiB", "0", "1.2.3G", "GiB", "24 Gi B", "0.1"])
def test_parse_size_rejects_junk(text):
    with pytest.raises(TpDeployError, match=r"--gpu-mem"):
        parse_size(text, "--gpu-mem")


def _smollm_like_plan(workspace) -> MemoryPlan:
    manifest = load_manifest(workspace(2, dtype=torch.bfloat16))
    return plan_memory(manifest, gpu_mem=24 * GIB, cache=CacheConfig(kv_dtype="int8", cache_max_entry_count=0.8),
                       compute_dtype=torch.bfloat16, max_model_len=8192)


def test_format_table_explains_the_totals(workspace):
    plan = _smollm_like_plan(workspace)
    text = format_table(plan)
    r = plan.ranks[plan.limiting_rank]
    for line in (f"weights  {r.weights / GIB:.2f} GiB/rank (S/P",
                 f"reserve  {r.reserve / GIB:.2f} GiB for the largest step (2048 prefill tokens",
                 f"KV cache = λ 0.80 × (24.00 − {r.weights / GIB:.2f} − {r.reserve / GIB:.2f}) GiB = "
                 f"{r.kv_bytes / GIB:.2f} GiB → {plan.kv_tokens:,} tokens",
                 f"maximum concurrency for 8192-token requests: {plan.max_concurrency}",
                 "grows with --gpu-mem, not with the model", f"{plan.bytes_per_token:>9,}  *"):
        assert line in text, f"missing {line!r} in\n{text}"
    assert len(text.splitlines()) == 2 + plan.tp + 1 + 1 + 7  # title, header, ranks, legend, blank, words


def test_png_is_written(workspace, tmp_path):
    path = draw(_smollm_like_plan(workspace), tmp_path / "plan.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(TpDeployError, match="is not a directory"):
        draw(_smollm_like_plan(workspace), tmp_path / "missing" / "plan.png")


def test_to_dict_is_json(workspace):
    plan = _smollm_like_plan(workspace)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["num_blocks"] == plan.num_blocks and d["ranks"][1]["kv_blocks"] == plan.ranks[1].kv_blocks
    assert d["model"]["head_dim"] == 16 and d["kv_dtype"] == "int8" and d["compute_dtype"] == "bfloat16"


@pytest.mark.slow
def test_smollm2_plan(smollm2, tmp_path):
    convert(ConvertOptions(smollm2, tmp_path / "ws", 3))  # 9 heads, 3 KV heads: one KV head per rank
    manifest = load_manifest(tmp_path / "ws")
    plan = plan_memory(manifest, gpu_mem=24 * GIB, cache=CacheConfig(), compute_dtype=torch.bfloat16,
                       max_model_len=8192)
    assert plan.model.parameters == 134_515_008  # SmolLM2-135M, tied embeddings
    assert plan.bytes_per_token == 2 * 30 * 1 * 64 * 2
    # 49152 vocab rows divide by 3 (no padding); the 2 × 30 + 1 norms are replicated on every rank.
    replicas = (3 - 1) * (2 * 30 + 1) * 576
    assert sum(r.weights for r in plan.ranks) == 2 * (plan.model.parameters + replicas)  # bf16 in memory
    assert plan.limiting_rank == 0 and plan.max_concurrency > 0 and plan.warnings == ()
