"""--pad-heads: the smallest padding in the checkpoint's own GQA groups, and where each padded head comes from."""
import dataclasses

import pytest

from formats.errors import ShardingError
from formats.head_padding import head_runs, head_source, pad_config, padded_counts, padding_cost
from formats.sharding import check_tp
from tests.formats.test_sharding import SMOLLM2


@pytest.mark.parametrize("heads, kv, tp, expected", [
    (9, 3, 2, (12, 4)),     # SmolLM2-135M at tp 2: one zero group of three
    (9, 3, 4, (12, 4)),     # ... at tp 4: one rank holds only the zero group
    (12, 4, 8, (16, 4)),    # groups of 3 padded to 4 so that each pair of ranks shares one KV head
    (12, 12, 8, (16, 16)),  # multi-head attention: four zero heads
    (32, 8, 8, (32, 8)),    # already divisible: no padding
    (14, 2, 4, (16, 2)),    # KV replicated to pairs of ranks: groups of 7 padded to 8
])
def test_padded_counts_are_the_smallest_that_tp_splits(heads, kv, tp, expected):
    assert padded_counts(heads, kv, tp) == expected
    h, k = expected
    assert h % tp == 0 and (k % tp == 0 or (tp % k == 0 and (h // k) % (tp // k) == 0))


def test_padded_heads_keep_their_groups():
    cfg = pad_config(SMOLLM2, 2)  # 9 heads in 3 groups -> 12 in 4
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.source_heads) == (12, 4, (9, 3))
    assert [head_source(cfg, "q", p) for p in range(12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, None, None, None]
    assert [head_source(cfg, "kv", p) for p in range(4)] == [0, 1, 2, None]
    wide = pad_config(dataclasses.replace(SMOLLM2, num_heads=12, num_kv_heads=4, hidden_size=768), 8)
    assert [head_source(wide, "q", p) for p in range(8)] == [0, 1, 2, None, 3, 4, 5, None]
    assert head_runs(wide, "q", 2, 6) == [(2, 3, 0), (3, 5, 2)]  # rank 1 of 4 heads: one head, a zero, two heads
    assert pad_config(SMOLLM2, 3) is SMOLLM2


def test_cost_and_refusal_hint():
    cost = padding_cost(pad_config(SMOLLM2, 2))
    assert cost["attention_weights_percent"] == 33.3 and cost["kv_cache_percent"] == 33.3
    assert padding_cost(SMOLLM2) is None
    with pytest.raises(ShardingError, match=r"valid --tp values: 1, 3; or pass --pad-heads"):
        check_tp(SMOLLM2, 2, heads_hint="or pass --pad-heads")
    odd_mlp = dataclasses.replace(SMOLLM2, intermediate_size=1537)  # padding heads would not help: no hint
    with pytest.raises(ShardingError, match=r"intermediate size 1537 of this model; valid --tp values: 1$"):
        check_tp(odd_mlp, 3, heads_hint="or pass --pad-heads")
