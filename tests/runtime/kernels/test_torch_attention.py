"""The batched CPU attention (``torch_attention``) against the per-sequence torch reference: awkward
lengths, head dims, GQA ratios, every cache precision, sliding windows, and garbage in unwritten slots."""
from __future__ import annotations

import pytest
import torch

from runtime.kernels import reference, torch_attention
from tests.runtime.kernels import paged_cases

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Decode: float32 math here, q's dtype in the reference (SDPA), outputs rounded to q's dtype on both sides.
DECODE_TOL = {
    F32: 5e-6,  # same fp32 math; only the order of the sums differs (seen: 6e-7)
    F16: 2e-3,  # outputs ~1 round to fp16 (ulp 1e-3) after differently rounded probabilities
    BF16: 2e-2,  # bf16's 8-bit mantissa: ulp 8e-3 at 1 (seen: 8e-3)
}
# Prefill: SDPA in q's dtype on both sides, over one padded batch here and one sequence at a time there.
PREFILL_TOL = {
    F32: 5e-6,  # fp32 on both sides, sums in another order (seen: 1e-6)
    F16: 4e-3,  # P rounded to fp16 before P @ V, the output to fp16: ulp 2e-3 at 2..4
    BF16: 3e-2,  # the same with bf16: ulp 1.6e-2 at 2..4 (seen: 1.6e-2)
}

# (bits, dtype of the stored or pre-quantization values and of q)
PRECISIONS = [
    pytest.param(32, F32, id="fp32"),
    pytest.param(16, F16, id="fp16"),
    pytest.param(16, BF16, id="bf16"),
    pytest.param(8, F32, id="int8"),
    pytest.param(8, BF16, id="int8-qbf16"),
    pytest.param(4, F32, id="int4"),
    pytest.param(4, F16, id="int4-qf16"),
]


def _case(bits, dtype, contexts, news, kv_heads, group, head_dim, block_size, seed=0):
    """A cache holding every sequence's first ``context`` tokens (this step's written too) and q (T, Hq, D)."""
    kv, pb, k, v = paged_cases.filled(bits, contexts, news, kv_heads, head_dim, block_size, "cpu",
                                      F32 if bits == 32 else dtype, seed=seed)
    reference.write_kv(kv, k, v, pb.slots, pb.keys)
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(sum(news), kv_heads * group, head_dim, generator=g).to(dtype)
    return q, kv, pb


def _decode(q, kv, pb, window=None, against=None):
    scale = q.shape[-1] ** -0.5
    got = torch_attention.decode_attention(q, kv, pb.block_tables, pb.seq_lens, scale, window, pb.tails)
    kv_ref, pb_ref = against or (kv, pb)
    want = reference.decode_attention(q, kv_ref, pb_ref.block_tables, pb_ref.seq_lens, scale, window, pb_ref.tails)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=DECODE_TOL[q.dtype], rtol=DECODE_TOL[q.dtype])


def _prefill(q, kv, pb, window=None, against=None):
    scale = q.shape[-1] ** -0.5
    got = torch_attention.prefill_attention(q, kv, pb, scale, window)
    kv_ref, pb_ref = against or (kv, pb)
    want = reference.prefill_attention(q, kv_ref, pb_ref, scale, window)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=PREFILL_TOL[q.dtype], rtol=PREFILL_TOL[q.dtype])


@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("bits,dtype", PRECISIONS)
def test_decode_every_precision(bits, dtype, head_dim):
    q, kv, pb = _case(bits, dtype, [1, 3, 17, 65], [1] * 4, 2, 3, head_dim, 16)
    _decode(q, kv, pb)


@pytest.mark.parametrize("block_size", [16, 64], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("group", [1, 3, 8], ids=lambda g: f"gqa{g}")
def test_decode_gqa_ratios_long_and_short(group, block_size):
    q, kv, pb = _case(16, BF16, [1025, 1, 65, 3, 17], [1] * 5, 2, group, 64, block_size, seed=group)
    _decode(q, kv, pb)


@pytest.mark.parametrize("window", [1, 17, 100, 2000], ids=lambda w: f"win{w}")
def test_decode_sliding_window(window):
    q, kv, pb = _case(8, F32, [1025, 3, 65], [1] * 3, 1, 3, 64, 16, seed=window)
    _decode(q, kv, pb, window)


@pytest.mark.parametrize("contexts,news", [
    pytest.param([1], [1], id="one-token"),
    pytest.param([3, 17, 65], [3, 17, 65], id="whole-prompts"),
    pytest.param([65, 17, 3], [17, 1, 2], id="chunks-after-cache"),
    pytest.param([1025, 3], [1025, 3], id="long-beside-short"),
    pytest.param([1025, 17, 65, 3], [70, 17, 9, 1], id="chunk-of-long"),
])
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("group", [1, 3, 8], ids=lambda g: f"gqa{g}")
def test_prefill_shapes(contexts, news, head_dim, group):
    q, kv, pb = _case(32, F32, contexts, news, 2, group, head_dim, 64 if head_dim == 128 else 16)
    _prefill(q, kv, pb)


@pytest.mark.parametrize("bits,dtype", PRECISIONS)
def test_prefill_every_precision(bits, dtype):
    q, kv, pb = _case(bits, dtype, [65, 17, 3, 33], [17, 1, 2, 33], 2, 3, 64, 16, seed=bits)
    _prefill(q, kv, pb)


@pytest.mark.parametrize("window", [1, 5, 16, 100], ids=lambda w: f"win{w}")
def test_prefill_sliding_window(window):
    q, kv, pb = _case(4, F16, [65, 17, 1025], [65, 9, 70], 1, 8, 128, 64, seed=window)
    _prefill(q, kv, pb, window)


@pytest.mark.parametrize("bits,dtype", [(32, F32), (16, BF16), (8, F32), (4, F16)],
                         ids=["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("window", [None, 9], ids=lambda w: f"win{w}")
def test_garbage_in_unwritten_slots_is_never_read(bits, dtype, window):
    """The runtime's cache is torch.empty: slots past each context and table padding may hold NaN, inf or
    1e38 (a huge key makes an infinite score, which a mask *added* to the scores turns into NaN)."""
    q, kv, pb = _case(bits, dtype, [65, 17, 3, 1], [17, 1, 3, 1], 2, 3, 64, 16, seed=11)
    spoiled = paged_cases.garbage(kv, pb, seed=3)
    _prefill(q, *spoiled, window, against=(kv, pb))
    last = pb.query_start[1:].long() - 1  # each sequence's last token, as a decode query
    _decode(q[last], *spoiled, window, against=(kv, pb))


def test_groups_bound_the_padding():
    # similar sequences share one call; a long prompt does not pad 31 short ones to its length
    assert torch_attention._groups([17] * 8, [33] * 8) == [list(range(8))]
    groups = torch_attention._groups([2000] + [20] * 31, [2000] + [20] * 31)
    assert sorted(i for g in groups for i in g) == list(range(32)) and [0] in groups and len(groups) == 2
    qlens, lens = [1, 70, 3, 1025, 9, 512, 1], [65, 70, 3, 1025, 2000, 512, 1]
    for group in torch_attention._groups(qlens, lens):
        padded = len(group) * max(qlens[i] for i in group) * max(lens[i] for i in group)
        own = sum(qlens[i] * lens[i] for i in group)
        assert len(group) == 1 or padded <= max(torch_attention.PAD_FREE, torch_attention.PAD_SLACK * own)
    many_long = torch_attention._groups([1] * 64, [4000] * 64)  # decodes' worth of keys: bounded per group
    assert all(len(g) * 4000 <= torch_attention.GROUP_KEYS for g in many_long) and sum(map(len, many_long)) == 64
