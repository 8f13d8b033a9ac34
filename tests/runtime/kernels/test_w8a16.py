"""The Triton W8A16 linear against ``cpu_fp8.w8a16_linear`` (the torch reference): awkward shapes, every dtype."""
from __future__ import annotations

import pytest
import torch

from formats.errors import TpDeployError
from runtime.kernels.cpu_fp8 import Fp8Weight
from runtime.kernels.cpu_fp8 import w8a16_linear as reference
from runtime.kernels.w8a16 import w8a16_linear

# Max |kernel - reference| over max |reference|. The weights match bit for bit (same fp32 product, same cast),
# so what is left is the output's rounding: the kernel rounds its fp32 sum once, the reference rounds x @ W.T
# to x's dtype and again after adding the bias; two ulps of the dtype cover both.
TOL = {
    torch.float32: 1e-5,  # fp32 on both sides: summation order only, K <= 384 terms
    torch.float16: 2 * 2.0 ** -10,  # 2 fp16 ulps
    torch.bfloat16: 2 * 2.0 ** -7,  # 2 bf16 ulps
}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# (M, K, N, B): M 1 and 3 decode, 17 and 65 prefill tiles; K 96 (a tp-4 shard of 384: 32-column blocks),
# K 384 with whole 128 blocks, B 96 (a scale column spans three 32-wide K steps), B 8 with K 40 (scales
# gathered per element, K not a multiple of 16); N never a multiple of the N tile.
SHAPES = [(1, 96, 72, 32), (3, 384, 200, 128), (17, 96, 136, 96), (65, 40, 24, 8), (1, 40, 24, 8), (65, 384, 72, 128)]


def _id(v) -> str:
    return "M{}-K{}-N{}-B{}".format(*v) if isinstance(v, tuple) else str(v).removeprefix("torch.")


def make_weight(k: int, n: int, b: int, device, seed: int = 0) -> Fp8Weight:
    """Random FP8 codes over the whole e4m3 range and scales of either sign, one per row and B columns."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = (torch.rand(n, -(-k // b), generator=gen) * 0.004 - 0.002)
    return Fp8Weight(weight.to(device), scale.to(device), b)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_w8a16_matches_reference(shape, dtype, device):
    m, k, n, b = shape
    w = make_weight(k, n, b, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device) if m % 2 else None  # odd M: with a bias
    out, ref = w8a16_linear(x, w, bias), reference(x, w, bias)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.3g}"


def test_w8a16_keeps_leading_dims_and_empty_batches(device):
    w = make_weight(96, 72, 32, device)
    x = torch.randn(2, 3, 96).to(device)
    assert w8a16_linear(x, w).shape == (2, 3, 72)
    assert w8a16_linear(x[:0], w).shape == (0, 3, 72)


@pytest.mark.parametrize("change,pattern", [
    (lambda x, w: (x[:, :64], w), r"x has 64 input features but the weight is \(72, 96\)"),
    (lambda x, w: (x, Fp8Weight(w.weight, w.scale.half(), 32)), r"float8_e4m3fn and float32"),
    (lambda x, w: (x, Fp8Weight(w.weight, w.scale, 64)), r"scale is \(72, 3\) with block_k=64, expected .*\(72, 2\)"),
    (lambda x, w: (x.int(), w), r"x is torch.int32"),
], ids=["K", "scale-dtype", "scale-shape", "x-dtype"])
def test_w8a16_refuses_mismatched_inputs(change, pattern, device):
    x, w = change(torch.randn(3, 96).to(device), make_weight(96, 72, 32, device))
    with pytest.raises(TpDeployError, match=pattern):
        w8a16_linear(x, w)
