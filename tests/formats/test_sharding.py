"""The sharding rules: tp validation messages, and that the plan covers every source exactly."""
import dataclasses

import pytest

from formats.config import ModelConfig
from formats.errors import ShardingError
from formats.shard_plan import file_groups, rank_tensor, source_names
from formats.sharding import check_tp, padded_size, source_shape, valid_tp_values

SMOLLM2 = ModelConfig(
    architecture="LlamaForCausalLM", num_layers=2, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True)


def test_tp_error_names_heads_and_valid_values():
    with pytest.raises(ShardingError, match=r"^--tp 2 does not divide the 9 attention heads of this model; "
                                            r"valid --tp values: 1, 3$"):
        check_tp(SMOLLM2, 2)


def test_tp_error_for_intermediate_size():
    cfg = dataclasses.replace(SMOLLM2, intermediate_size=1537)
    with pytest.raises(ShardingError, match="does not divide the intermediate size 1537"):
        check_tp(cfg, 3)
    assert valid_tp_values(cfg) == [1]


def test_kv_heads_neither_divisible_nor_multiple():
    cfg = dataclasses.replace(SMOLLM2, num_heads=12, num_kv_heads=8, head_dim=48, intermediate_size=1536)
    with pytest.raises(ShardingError, match="neither divides nor is a multiple of the 8 KV heads"):
        check_tp(cfg, 3)
    assert valid_tp_values(cfg) == [1, 2, 4]


def _coverage(cfg: ModelConfig, tp: int) -> dict[str, list[int]]:
    """How many ranks hold each element (counted per unit row along the split axis)."""
    counts = {}
    for group in file_groups(cfg):
        for rank in range(tp):
            for t in group.tensors:
                plan = rank_tensor(t, cfg, tp, rank)
                dst_total = plan.shape[plan.pieces[0].axis]
                assert all(p.dst[1] <= dst_total for p in plan.pieces)
                for p in plan.pieces:
                    n = source_shape(p.source, cfg)[p.axis]
                    c = counts.setdefault(p.source, [0] * n)
                    for i in range(*p.src):
                        c[i] += 1
    return counts


@pytest.mark.parametrize("tp", [1, 3, 9], ids=lambda t: f"tp{t}")
def test_plan_covers_every_source_element(tp):
    cfg = dataclasses.replace(SMOLLM2, intermediate_size=1152)  # 1536 does not divide by 9
    counts = _coverage(cfg, tp)
    assert set(counts) == set(source_names(cfg))
    for name, c in counts.items():
        if "norm" in name:
            assert set(c) == {tp}, name  # replicated
        elif tp == 9 and (".wk." in name or ".wv." in name):
            assert set(c) == {3}, name  # 3 KV heads replicated over 9 ranks
        else:
            assert set(c) == {1}, name  # split: each element on exactly one rank


def test_vocab_is_padded_and_split_without_full_copy():
    cfg = dataclasses.replace(SMOLLM2, vocab_size=49153, tie_word_embeddings=False)
    assert padded_size(49153, 4) == 49156
    shapes = [rank_tensor("lm_head.weight", cfg, 4, r).shape for r in range(4)]
    assert shapes == [(12289, 576)] * 4
    last = rank_tensor("lm_head.weight", cfg, 4, 3).pieces[0]
    assert last.src == (36867, 49153) and last.dst == (0, 12286)  # 3 zero rows of padding


def test_fused_qkv_layout_per_rank():
    plan = rank_tensor("layers.1.attention.wqkv.weight", SMOLLM2, 3, 2)
    assert plan.shape == (3 * 64 + 2 * 64, 576)
    assert [(p.source, p.src, p.dst) for p in plan.pieces] == [
        ("layers.1.attention.wq.weight", (384, 576), (0, 192)),
        ("layers.1.attention.wk.weight", (128, 192), (192, 256)),
        ("layers.1.attention.wv.weight", (128, 192), (256, 320)),
    ]


def test_row_parallel_splits_input_axis():
    plan = rank_tensor("layers.0.feed_forward.w_down.weight", SMOLLM2, 3, 1)
    assert plan.shape == (576, 512)
    assert plan.pieces[0].axis == 1 and plan.pieces[0].src == (512, 1024)


def test_tied_model_has_no_lm_head():
    names = [t for g in file_groups(SMOLLM2) for t in g.tensors]
    assert "lm_head.weight" not in names and "tok_embeddings.weight" in names
