"""The canonical int4 layout and its sharding, derived from the dense rules."""
import dataclasses

import pytest
import torch

from formats import int4
from formats.errors import ShardingError
from formats.shard_plan import file_groups, int4_source_shape, rank_tensor, source_names
from formats.sharding import check_tp
from tests.formats.test_sharding import SMOLLM2


@pytest.mark.parametrize("k,n", [(8, 1), (24, 3), (64, 17), (1536, 65)], ids=lambda v: str(v))
def test_pack_unpack_round_trip(k, n):
    values = torch.randint(0, 16, (k, n), generator=torch.Generator().manual_seed(k * n))
    packed = int4.pack(values)
    assert packed.dtype == torch.int32 and packed.shape == (k // 8, n)
    assert torch.equal(int4.unpack(packed), values.to(torch.int32))


def test_bit_order_is_little_endian_along_k():
    values = torch.arange(8).reshape(8, 1) + 1  # rows 0..7 hold 1..8
    assert int4.pack(values).item() & 0xFFFFFFFF == 0x87654321  # int32 storage is signed


def test_dequantize_formula_in_scale_dtype():
    q = torch.tensor([[0], [15], [8], [3]] * 2, dtype=torch.int32)  # (8, 1)
    scales = torch.tensor([[0.5]], dtype=torch.float16)
    zeros = torch.tensor([[8]], dtype=torch.uint8)
    w = int4.dequantize(int4.pack(q), scales, zeros, group_size=8)
    assert w.dtype == torch.float16
    assert w[:4, 0].tolist() == [-4.0, 3.5, 0.0, -2.5]


@pytest.mark.parametrize("tp", [1, 3])
def test_int4_plan_covers_each_quantized_source_once(tp):
    counts = {}
    for group in file_groups(SMOLLM2, quantized=True):
        for rank in range(tp):
            for t in group.tensors:
                for p in rank_tensor(t, SMOLLM2, tp, rank, group_size=64).pieces:
                    if p.source.endswith(int4.PARTS):
                        n = int4_source_shape(p.source, SMOLLM2, 64)[p.axis]
                        c = counts.setdefault(p.source, [0] * n)
                        for i in range(*p.src):
                            c[i] += 1
    expected = {n for n in source_names(SMOLLM2, quantized=True) if n.endswith(int4.PARTS)}
    assert set(counts) == expected and all(set(c) == {1} for c in counts.values())


def test_row_parallel_int4_split_is_in_packs_and_groups():
    q = rank_tensor("layers.2.feed_forward.w_down.qweight", SMOLLM2, 3, 2, group_size=64)
    s = rank_tensor("layers.2.feed_forward.w_down.scales", SMOLLM2, 3, 2, group_size=64)
    assert q.shape == (512 // 8, 576) and q.pieces[0].src == (128, 192) and q.pieces[0].axis == 0
    assert s.shape == (512 // 64, 576) and s.pieces[0].src == (16, 24)


def test_column_parallel_int4_split_keeps_heads_whole():
    z = rank_tensor("layers.0.attention.wqkv.zeros", SMOLLM2, 3, 0, group_size=64)
    assert z.shape == (576 // 64, 320) and [p.axis for p in z.pieces] == [1, 1, 1]
    assert [p.src for p in z.pieces] == [(0, 192), (0, 64), (0, 64)]


def test_tp_refused_when_row_split_leaves_a_partial_group():
    cfg = dataclasses.replace(SMOLLM2, num_heads=8, num_kv_heads=4, intermediate_size=1088)  # 17 groups of 64
    check_tp(cfg, 2)  # dense: fine
    with pytest.raises(ShardingError, match=r"^--tp 2 gives each rank 544 of the 1088 input features of w_down "
                                            r"\(down_proj\), not a multiple of the quantization group size 64 "
                                            r".*; valid --tp values: 1$"):
        check_tp(cfg, 2, group_size=64)
