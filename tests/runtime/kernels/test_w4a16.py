"""The Triton W4A16 linear against ``reference.w4a16_linear``: both paths, awkward shapes, every dtype."""
from __future__ import annotations

import pytest
import torch

from formats import int4
from formats.errors import TpDeployError
from runtime.kernels import reference
from runtime.kernels.reference import Int4Weight
from runtime.kernels.w4a16 import DECODE_MAX_M, Config, pick_config, w4a16_linear

# Max |kernel - reference| over max |reference|. The weights match bit for bit (same dequant), so
# what is left is the output's rounding: the kernel rounds its fp32 sum once, the reference rounds
# x @ W to x's dtype and again after adding the bias; two ulps of the dtype cover both.
TOL = {
    torch.float32: 1e-5,  # fp32 on both sides: summation order only, K <= 320 terms
    torch.float16: 2 * 2.0 ** -10,  # 2 fp16 ulps (10 mantissa bits)
    torch.bfloat16: 2 * 2.0 ** -7,  # 2 bf16 ulps (7 mantissa bits)
}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (M, K, N, G): M on both sides of the decode/prefill switch; K/G odd (3, 5 groups) or one group;
# N not a multiple of the 128-wide N tile; K/8 = 12, 40 packed rows, not multiples of 8 or 16.
SHAPES = [(1, 96, 72, 32), (3, 320, 200, 64), (16, 256, 72, 128), (17, 96, 200, 32), (64, 320, 72, 64),
          (256, 128, 200, 128)]
# (x dtype, scales dtype): fp32 activations with 16-bit scales is the CPU model path.
DTYPES = [(F32, F16), (F32, F32), (F16, F16), (F16, F32), (BF16, BF16)]


def _id(v) -> str:
    if isinstance(v, tuple) and isinstance(v[0], torch.dtype):
        return "x_{}-s_{}".format(*(str(d).removeprefix("torch.") for d in v))
    return "M{}-K{}-N{}-G{}".format(*v) if isinstance(v, tuple) else str(v)


def make_weight(k: int, n: int, g: int, scale_dtype: torch.dtype, device, seed: int = 0,
                pow2_scales: bool = False) -> Int4Weight:
    """Random nibbles and zeros packed with ``formats.int4.pack``; signed scales of either sign."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.uint8)
    if pow2_scales:  # 2**-1 .. 2**-4: every product and sum below is exact in fp32
        scales = 2.0 ** -torch.randint(1, 5, (k // g, n), generator=gen).float()
    else:
        scales = (torch.rand(k // g, n, generator=gen) * 0.04 - 0.02)
    return Int4Weight(int4.pack(q).to(device), scales.to(scale_dtype).to(device), zeros.to(device), g)


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, device, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    return x, torch.randn(n, generator=gen).to(dtype).to(device)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.3g}"


@pytest.mark.parametrize("dtypes", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_reference(shape, dtypes, with_bias, device):
    (m, k, n, g), (x_dtype, s_dtype) = shape, dtypes
    w = make_weight(k, n, g, s_dtype, device)
    x, bias = _inputs(m, k, n, x_dtype, device)
    bias = bias if with_bias else None
    assert_matches(w4a16_linear(x, w, bias), reference.w4a16_linear(x, w, bias), x_dtype)


@pytest.mark.parametrize("s_dtype", [F16, BF16, F32], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m", [1, 33], ids=lambda m: f"M{m}")
def test_exact_when_every_sum_is_representable(m, s_dtype, device):
    """Small-integer activations and power-of-two scales: any order of summation is exact, so equal."""
    k, n, g = 320, 72, 64
    w = make_weight(k, n, g, s_dtype, device, pow2_scales=True)
    x = torch.randint(-2, 3, (m, k), generator=torch.Generator().manual_seed(2)).float().to(device)
    assert torch.equal(w4a16_linear(x, w), reference.w4a16_linear(x, w))


# Explicit launches: split-K on the prefill kernel with a short last run, BLOCK_K above G (cut to G),
# narrow N tiles with a partial last one, and several GROUP_M groups with a short last group.
CONFIGS = [
    (5, Config(block_m=16, block_n=32, block_k=128, split_k=4)),
    (40, Config(block_m=16, block_n=32, block_k=64, split_k=2, group_m=2)),
    (100, Config(block_m=32, block_n=64, block_k=32, split_k=1, group_m=2)),
]


@pytest.mark.parametrize("m,cfg", CONFIGS, ids=lambda v: f"M{v}" if isinstance(v, int) else
                         f"bm{v.block_m}-bn{v.block_n}-bk{v.block_k}-sk{v.split_k}-gm{v.group_m}")
def test_explicit_configs(m, cfg, device):
    k, n, g = 320, 72, 32
    w = make_weight(k, n, g, F16, device)
    x, bias = _inputs(m, k, n, F32, device)
    assert_matches(w4a16_linear(x, w, bias, config=cfg), reference.w4a16_linear(x, w, bias), F32)


def test_leading_dims_and_non_contiguous_x(device):
    k, n, g = 128, 72, 64
    w = make_weight(k, n, g, F16, device)
    x = torch.randn(k, 6, generator=torch.Generator().manual_seed(3)).to(device).t().reshape(2, 3, k)
    assert not x.is_contiguous()
    out = w4a16_linear(x, w)
    assert out.shape == (2, 3, n)
    assert_matches(out, reference.w4a16_linear(x, w), F32)


def test_empty_batch(device):
    w = make_weight(64, 8, 32, F16, device)
    assert w4a16_linear(torch.zeros(0, 64, device=device), w).shape == (0, 8)


def test_paths_switch_at_decode_max_m(device):
    decode = pick_config(DECODE_MAX_M, 6144, 4096, 128, device)
    prefill = pick_config(DECODE_MAX_M + 1, 6144, 4096, 128, device)
    assert decode.block_m == 16 and decode.split_k >= 1 and prefill.split_k == 1
    assert pick_config(1, 72, 96, 32, device).block_k == 32  # K tiles never straddle a group


@pytest.mark.parametrize("k_tiles", [1, 3, 5, 7, 32, 112])
def test_split_k_leaves_no_split_empty(k_tiles, device):
    cfg = pick_config(1, 8, k_tiles * 128, 128, device)  # one N tile: the most splits
    per_split = -(-k_tiles // cfg.split_k)
    assert 1 <= cfg.split_k <= k_tiles and (cfg.split_k - 1) * per_split < k_tiles


@pytest.mark.parametrize("bad,match", [
    (dict(x_k=104), "input features"),
    (dict(g=24), "group_size=24"),
    (dict(x_dtype=torch.int32), "x is torch.int32"),
    (dict(zeros_dtype=torch.int32), "zeros torch.int32"),
    (dict(bias_n=7), r"bias is \(7,\)"),
], ids=["k", "group", "x_dtype", "zeros_dtype", "bias"])
def test_rejects_mismatches(bad, match, device):
    k, n = 96, 8
    w = make_weight(k, n, 32, F16, device)
    w = Int4Weight(w.qweight, w.scales, w.zeros.to(bad.get("zeros_dtype", torch.uint8)), bad.get("g", 32))
    x = torch.ones(2, bad.get("x_k", k), dtype=bad.get("x_dtype", F32), device=device)
    bias = torch.ones(bad["bias_n"], device=device) if "bias_n" in bad else None
    with pytest.raises(TpDeployError, match=match):
        w4a16_linear(x, w, bias)
