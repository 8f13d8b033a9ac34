"""Triton paged decode attention against the torch reference: awkward lengths, GQA, every cache precision."""
from __future__ import annotations

import pytest
import torch

from formats.errors import TpDeployError
from runtime.kernels import reference
from runtime.kernels.decode_attention import BLOCK_N, decode_attention, pick_num_splits
from tests.runtime.kernels.paged_cases import clone, filled

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ATOL = {
    F32: 5e-6,  # same fp32 math, only the order of the sums and exp2-vs-exp differ (seen: 5e-7)
    F16: 2e-3,  # outputs ~1 round to fp16 (ulp 1e-3); the reference rounds its probabilities differently
    BF16: 2e-2,  # bf16 keeps 8 mantissa bits: ulp 8e-3 at 1, probabilities rounded to bf16 before P @ V
}
RTOL = {F32: 5e-6, F16: 2e-3, BF16: 2e-2}  # same reasons, for the few outputs above 1
SPLIT_ATOL = 1e-5  # fp32 split vs unsplit: only the partials' merge order differs

# (bits, dtype of the stored or pre-quantization values, q dtype); int caches are read with fp32 or fp16 q
PRECISIONS = [
    pytest.param(32, F32, F32, id="fp32"),
    pytest.param(16, F16, F16, id="fp16"),
    pytest.param(16, BF16, BF16, id="bf16"),
    pytest.param(8, F32, F32, id="int8-q32"),
    pytest.param(8, F16, F16, id="int8-q16"),
    pytest.param(4, F32, F32, id="int4-q32"),
    pytest.param(4, F16, F16, id="int4-q16"),
]


def make(bits, contexts, kv_heads, group, head_dim, block_size, device, dtype, q_dtype, seed=0, q_scale=1.0):
    """A cache holding each sequence's first ``context`` tokens (the last one written this step) and q."""
    kv, pb, k_new, v_new = filled(bits, contexts, [1] * len(contexts), kv_heads, head_dim, block_size, device,
                                  dtype, seed=seed)
    reference.write_kv(kv, k_new, v_new, pb.slots, pb.keys)
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(len(contexts), kv_heads * group, head_dim, generator=g) * q_scale  # (B, Hq, D)
    return q.to(q_dtype).to(device), kv, pb


def run(q, kv, pb, window=None, num_splits=None) -> torch.Tensor:
    return decode_attention(q, kv, pb.block_tables, pb.seq_lens, q.shape[-1] ** -0.5, window, pb.tails, num_splits)


def assert_matches_reference(q, kv, pb, window=None, num_splits=None) -> torch.Tensor:
    out = run(q, kv, pb, window, num_splits)
    ref = reference.decode_attention(q, kv, pb.block_tables, pb.seq_lens, q.shape[-1] ** -0.5, window, pb.tails)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[q.dtype], rtol=RTOL[q.dtype])
    return out


@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("bits,dtype,q_dtype", PRECISIONS)
def test_short_lengths_every_precision(bits, dtype, q_dtype, head_dim, device):
    q, kv, pb = make(bits, [1, 3, 17, 65], 2, 3, head_dim, 16, device, dtype, q_dtype)
    assert_matches_reference(q, kv, pb)


@pytest.mark.parametrize("block_size", [16, 64], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("group", [1, 3, 8], ids=lambda g: f"gqa{g}")
def test_gqa_ratios(group, block_size, device):
    q, kv, pb = make(16, [65, 3, 17], 2, group, 64, block_size, device, F16, F16, seed=group)
    assert_matches_reference(q, kv, pb)


@pytest.mark.parametrize("bits,dtype,head_dim,block_size", [
    pytest.param(16, F16, 128, 64, id="fp16-D128-bs64"),
    pytest.param(4, F16, 64, 16, id="int4-D64-bs16"),
])
def test_long_and_short_in_one_batch(bits, dtype, head_dim, block_size, device):
    q, kv, pb = make(bits, [1025, 1, 65], 1, 3, head_dim, block_size, device, dtype, dtype, seed=3)
    assert pick_num_splits(3, 1, pb.block_tables.shape[1] * block_size) > 1  # the default splits the long one
    assert_matches_reference(q, kv, pb)


@pytest.mark.parametrize("bits,dtype,head_dim", [pytest.param(16, F16, 80, id="fp16-D80"),
                                                pytest.param(4, F32, 80, id="int4-D80"),
                                                pytest.param(8, F16, 96, id="int8-D96"),
                                                pytest.param(16, BF16, 256, id="bf16-D256"),
                                                pytest.param(4, BF16, 256, id="int4-D256")])
def test_head_dims_of_the_model_families(bits, dtype, head_dim, device):
    # D=80/96 are padded to 128 in registers (int4's 40/48 bytes a row are not powers of two either);
    # 256 is Gemma 3's
    q, kv, pb = make(bits, [65, 3], 2, 2, head_dim, 16, device, dtype, dtype)
    assert_matches_reference(q, kv, pb, num_splits=2)


def test_q_as_a_strided_view(device):
    # q sliced out of a fused (B, Hq + 2 Hkv, D) projection, as the model produces it
    q, kv, pb = make(32, [17, 65], 2, 2, 64, 16, device, F32, F32)
    fused = torch.cat([q, torch.randn_like(q)], dim=1)
    assert_matches_reference(fused[:, : q.shape[1]], kv, pb)


@pytest.mark.parametrize("num_splits", [2, 5, 32], ids=lambda s: f"splits{s}")
def test_splits_equal_one_split(num_splits, device):
    # peaky scores (q * 4) so that each split's max differs and the merge's rescaling matters;
    # 32 splits of a 17-tile sequence leave some splits empty
    q, kv, pb = make(32, [1025, 17], 2, 2, 64, 64, device, F32, F32, seed=5, q_scale=4.0)
    one = run(q, kv, pb, num_splits=1)
    many = assert_matches_reference(q, kv, pb, num_splits=num_splits)
    torch.testing.assert_close(many, one, atol=SPLIT_ATOL, rtol=SPLIT_ATOL)


@pytest.mark.parametrize("num_splits", [None, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("window", [1, 17, 100, 2000], ids=lambda w: f"win{w}")
def test_sliding_window(window, num_splits, device):
    q, kv, pb = make(8, [1025, 3, 65], 1, 3, 64, 16, device, F32, F32, seed=window)
    assert_matches_reference(q, kv, pb, window, num_splits)


def poison_hidden(kv, pb, window):
    """NaN in every cached token no query may see (other sequences' tails, spare blocks, outside the window).
    int4 keys: NaN in the channel params of every block not yet full or without a visible key, and in
    every tail row without a visible key (unused slots included)."""
    bs, channel = kv.block_size, kv.channel_keys
    visible = torch.zeros(kv.k.shape[0], bs, dtype=torch.bool)  # (num_blocks, block_size)
    full = torch.zeros(kv.k.shape[0], dtype=torch.bool)  # (num_blocks,)
    in_tail = torch.zeros(kv.k_tail.shape[:1] + (bs,) if channel else (0, bs), dtype=torch.bool)  # (slots, bs)
    tails = pb.tails.tolist() if channel else [None] * len(pb.seq_lens)
    for table, n, slot in zip(pb.block_tables.tolist(), pb.seq_lens.tolist(), tails):
        full[table[: n // bs]] = True
        for j in range(max(0, n - window) if window else 0, n):
            visible[table[j // bs], j % bs] = True
            if channel and j >= n // bs * bs:
                in_tail[slot, j % bs] = True
    hidden = (~visible).to(kv.k.device)
    per_token = (kv.v_params,) if channel else (kv.k_params, kv.v_params) if kv.quantized else (kv.k, kv.v)
    for t in per_token:
        t.permute(0, 2, 1, 3)[hidden] = float("nan")  # (num_blocks, block_size, H, X) view, written in place
    if channel:
        kv.k_params[~(full & visible.any(1)).to(kv.k.device)] = float("nan")
        kv.k_tail.permute(0, 2, 1, 3)[~in_tail.to(kv.k.device)] = float("nan")


@pytest.mark.parametrize("window", [None, 40], ids=lambda w: f"win{w}")
@pytest.mark.parametrize("bits,dtype", [pytest.param(16, F16, id="fp16"), pytest.param(4, F32, id="int4")])
def test_reads_only_visible_tokens(bits, dtype, window, device):
    q, kv, pb = make(bits, [200, 3, 65], 2, 1, 64, 16, device, dtype, dtype, seed=9)
    ref = reference.decode_attention(q, kv, pb.block_tables, pb.seq_lens, q.shape[-1] ** -0.5, window, pb.tails)
    poisoned = clone(kv)
    poison_hidden(poisoned, pb, window)
    for num_splits in (1, 3):
        out = run(q, poisoned, pb, window, num_splits)
        torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=RTOL[dtype])


@pytest.mark.parametrize("window", [None, 20], ids=lambda w: f"win{w}")
@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("block_size", [16, 64], ids=lambda b: f"bs{b}")
def test_int4_tails_at_block_edges(block_size, num_splits, window, device):
    """int4 keys come from two places: full blocks' codes (per-channel params) and the fp16 tail from the
    last full block on. Lengths 1 (only a tail), exact multiples of block_size (empty tail), one past and
    one short of a block edge; everything a query may not see is NaN."""
    bs = block_size
    lens = [1, bs, bs + 1, 2 * bs - 1, 4 * bs, 3 * bs + 5]
    q, kv, pb = make(4, lens, 2, 2, 64, bs, device, F16, F16, seed=bs)
    ref = reference.decode_attention(q, kv, pb.block_tables, pb.seq_lens, q.shape[-1] ** -0.5, window, pb.tails)
    poison_hidden(kv, pb, window)
    out = run(q, kv, pb, window, num_splits)
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[F16], rtol=RTOL[F16])


def test_int4_needs_tails(device):
    q, kv, pb = make(4, [17, 3], 2, 2, 64, 16, device, F32, F32)
    for tails in (None, pb.tails.long(), pb.tails[:1]):
        with pytest.raises(TpDeployError, match=r"pass tails \(2,\) int32"):
            decode_attention(q, kv, pb.block_tables, pb.seq_lens, 0.125, tails=tails)


def test_empty_sequence_gives_zeros(device):
    q, kv, pb = make(32, [65, 3], 2, 2, 64, 16, device, F32, F32)
    lens = pb.seq_lens.clone()
    lens[1] = 0  # a padding row of a fixed-size batch
    for num_splits in (1, 2):
        out = decode_attention(q, kv, pb.block_tables, lens, 0.125, tails=pb.tails, num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()


def test_split_heuristic():
    assert pick_num_splits(64, 8, 32768) == 1  # 512 programs already fill the GPU
    assert pick_num_splits(1, 8, 100) == 1  # two tiles: not worth a reduce
    long = pick_num_splits(1, 8, 32768)
    assert long * 8 >= 132 and 32768 // long >= 4 * BLOCK_N  # fills the SMs, splits stay >= 4 tiles
    assert pick_num_splits(1, 1, 10 ** 7) <= 64


def test_rejects_bad_arguments(device):
    q, kv, pb = make(32, [17], 2, 2, 64, 16, device, F32, F32)
    with pytest.raises(TpDeployError, match="not a multiple of 2 KV heads"):
        decode_attention(q[:, :3], kv, pb.block_tables, pb.seq_lens, 0.125)
    with pytest.raises(TpDeployError, match="int32"):
        decode_attention(q, kv, pb.block_tables.long(), pb.seq_lens, 0.125)
    with pytest.raises(TpDeployError, match="head_dim 128"):
        decode_attention(torch.cat([q, q], -1), kv, pb.block_tables, pb.seq_lens, 0.125)
    with pytest.raises(TpDeployError, match="window"):
        decode_attention(q, kv, pb.block_tables, pb.seq_lens, 0.125, window=0)
