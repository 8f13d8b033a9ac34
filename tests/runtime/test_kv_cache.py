"""The paged cache's bookkeeping: formats and their byte counts, blocks, rotation, sizing."""
import pytest
import torch

from formats.errors import TpDeployError
from runtime import kernels
from runtime.config import CacheConfig
from runtime.kernels.paged import PARAM_DTYPE, dequantize, quantize
from runtime.kv.blocks import BlockManager
from runtime.kv.cache import PagedKVCache
from runtime.kv.format import KVShape, from_quant_policy, key_rotation, kv_format

# (head_dim, int8 minimum, int4 minimum): tokens at equal memory vs fp16, scale and zero counted (int4:
# issue 16's floor; keys' per-channel parameters of a 64-token block cost what per-token ones did at D=64).
CAPACITY_TARGETS = [(64, 1.85, 3.5), (128, 1.9, 3.5)]


@pytest.mark.parametrize("head_dim,int8_min,int4_min", CAPACITY_TARGETS, ids=lambda v: str(v))
def test_quantized_caches_hold_more_tokens_in_the_same_memory(head_dim, int8_min, int4_min):
    budget = 1 << 30

    def tokens(name):
        shape = KVShape(30, 3, head_dim, kv_format(name, torch.float16, head_dim))
        return BlockManager(shape.blocks_for(budget), shape.block_size).capacity_tokens

    assert tokens("int8") / tokens("fp16") >= int8_min
    assert tokens("int4") / tokens("fp16") >= int4_min


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8", "int4"])
def test_allocated_bytes_are_what_the_accounting_says(name):
    shape = KVShape(2, 3, 64, kv_format(name, torch.float32, 64), block_size=16)
    cache = PagedKVCache(shape, 5, torch.device("cpu"), kernels.select(torch.device("cpu")))
    assert cache.nbytes == 5 * shape.bytes_per_block
    assert (cache.k_params is None) == (name in ("fp32", "bf16"))
    if cache.k_params is not None:  # int4 keys: a scale and zero per channel of a block
        rows = 64 if name == "int4" else 16
        assert cache.k_params.dtype == PARAM_DTYPE and cache.k_params.shape == (2, 5, 3, rows, 2)
        assert cache.v_params.shape == (2, 5, 3, 16, 2)


def test_auto_follows_the_compute_dtype_and_bad_names_are_refused():
    assert kv_format("auto", torch.bfloat16, 64).name == "bf16"
    assert kv_format("int4", torch.float16, 64).packed_dim(64) == 32
    with pytest.raises(TpDeployError, match="--kv-dtype 'fp8' is not supported; choose one of auto, fp32"):
        kv_format("fp8", torch.float16, 64)
    with pytest.raises(TpDeployError, match="even head_dim"):
        kv_format("int4", torch.float16, 65)
    with pytest.raises(TpDeployError, match="power of two, got 48"):
        KVShape(1, 1, 64, kv_format("fp16", torch.float16, 64), block_size=48)


def test_lmdeploy_quant_policy_maps_to_kv_dtype():
    assert [from_quant_policy(p) for p in (0, 8, 4)] == ["auto", "int8", "int4"]
    with pytest.raises(TpDeployError, match="--quant-policy 2 is not supported"):
        from_quant_policy(2)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_at_most_half_a_step(bits):
    x = torch.randn(7, 3, 64) * torch.tensor([0.01, 1.0, 300.0])[None, :, None]  # (T, H, D): three magnitudes
    codes, params = quantize(x, bits)
    assert codes.shape == (7, 3, 64 if bits == 8 else 32) and params.shape == (7, 3, 2)
    err = (dequantize(codes, params, bits, torch.float32) - x).abs()
    assert (err <= params[..., :1].float() * 0.5 + 1e-3 * x.abs()).all()  # + fp16 rounding of the zero point


def test_constant_rows_survive_quantization():
    x = torch.full((2, 1, 64), 3.0)
    codes, params = quantize(x, 4)
    assert torch.equal(dequantize(codes, params, 4, torch.float32), x)


@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_key_rotation_is_orthonormal_so_scores_are_unchanged(head_dim):
    r = key_rotation(head_dim, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(r @ r.T, torch.eye(head_dim, dtype=torch.float64))
    q, k = torch.randn(5, head_dim, dtype=torch.float64), torch.randn(9, head_dim, dtype=torch.float64)
    torch.testing.assert_close((q @ r) @ (k @ r).T, q @ k.T)


def test_block_manager_grows_frees_and_reuses_blocks():
    bm = BlockManager(num_blocks=4, block_size=16)
    assert bm.grow(1, 17) == (0, 1)  # two blocks for 17 tokens
    assert bm.grow(1, 32) == (0, 1)  # still fits
    assert bm.grow(2, 1) == (2,)
    assert not bm.can_grow(3, 33) and bm.can_grow(3, 16)
    with pytest.raises(TpDeployError, match="out of blocks: sequence 3 needs 3 more, 1 of 4 are free"):
        bm.grow(3, 33)
    bm.free(1)
    assert bm.num_free == 3 and bm.grow(3, 33) == (0, 1, 3)  # freed blocks come back first
    bm.free(2), bm.free(3), bm.free(99)  # freeing an unknown sequence is a no-op
    assert bm.num_free == 4 and bm.tables == {}


def test_block_table_tuple_is_reused_until_the_table_changes():
    bm = BlockManager(num_blocks=8, block_size=16, prefix_caching=True)
    first = bm.grow(1, 17)
    assert bm.table(1) is first and bm.grow(1, 32) is first  # unchanged: the same object, no copy per step
    grown = bm.grow(1, 33)
    assert grown == first + (grown[-1],) and bm.table(1) is grown
    bm.free(1)
    assert bm.table(1) == ()
    regrown = bm.grow(1, 40)  # LIFO: the same blocks again, in a new table
    assert regrown == grown and regrown is not grown
    tokens = list(range(40))
    bm.register_full_blocks(1, tokens, 40)
    assert bm.match_prefix(2, tokens + [7]) == 32 and bm.table(2) == bm.table(1)[:2]  # shared prefix blocks
    bm.free(1), bm.free(2)
    assert bm.table(2) == () and bm.num_free == 8


def test_block_manager_refuses_an_empty_cache():
    with pytest.raises(TpDeployError, match="no room for even one block"):
        BlockManager(0, 64)


def test_cache_config_refuses_bad_sizes():
    with pytest.raises(TpDeployError, match="--cache-max-entry-count must be in"):
        CacheConfig(cache_max_entry_count=1.5)
    with pytest.raises(TpDeployError, match="--kv-cache-tokens must be >= 1"):
        CacheConfig(kv_cache_tokens=0)
    with pytest.raises(TpDeployError, match="--gpu-mem must be positive"):
        CacheConfig(gpu_mem=0)


def test_int4_sequences_hold_one_tail_slot_each():
    bm = BlockManager(num_blocks=8, block_size=16, prefix_caching=True, tail_slots=2)
    bm.grow(1, 20), bm.grow(2, 5)
    assert {bm.tail(1), bm.tail(2)} == {0, 1} and bm.tail(3) == -1
    assert bm.grow(1, 40) and bm.tail(1) in (0, 1)  # growing keeps the slot
    assert not bm.can_grow(3, 1)  # blocks are free, but no tail slot is
    with pytest.raises(TpDeployError, match="out of tail slots: sequence 3"):
        bm.grow(3, 1)
    held = bm.tail(2)
    bm.free(2)
    assert bm.can_grow(3, 1) and bm.grow(3, 1) and bm.tail(3) == held
    bm.register_full_blocks(1, list(range(40)), 40)
    assert bm.match_prefix(4, list(range(40)) + [1]) == 32  # a prefix hit shares blocks, still needs a slot
    assert not bm.can_grow(4, 41) and bm.tail(4) == -1
    bm.free(1)
    assert bm.can_grow(4, 41) and bm.grow(4, 41) and bm.tail(4) >= 0
    assert BlockManager(4, 16).tail(1) == -1 and BlockManager(4, 16).grow(1, 3)  # other formats need none


@pytest.mark.parametrize("head_dim,block_size", [(64, 64), (128, 64), (64, 16), (80, 128)])
def test_int4_bytes_count_channel_params_per_block_and_tails_apart(head_dim, block_size):
    shape = KVShape(3, 2, head_dim, kv_format("int4", torch.float16, head_dim), block_size=block_size)
    k, v = shape.fmt.block_bytes(head_dim, block_size)
    assert k == block_size * head_dim // 2 + head_dim * 4 and v == block_size * (head_dim // 2 + 4)
    assert shape.bytes_per_block == 3 * 2 * (k + v) and shape.bytes_per_token * block_size == shape.bytes_per_block
    cache = PagedKVCache(shape, 5, torch.device("cpu"), kernels.select(torch.device("cpu")), tail_slots=7)
    assert cache.nbytes == 5 * shape.bytes_per_block  # the tails are not blocks: the reserve counts them
    assert cache.k_tail.shape == (3, 7, 2, block_size, head_dim) and cache.k_tail.dtype == torch.float16
    assert shape.tail_bytes(7) == cache.k_tail.numel() * 2
    assert KVShape(3, 2, head_dim, kv_format("int8", torch.float16, head_dim)).tail_bytes(7) == 0
