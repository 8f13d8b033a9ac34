"""int4 linears on CPU: torch's packed int4 kernel and dequantize-once against the per-call reference."""
import pytest
import torch

from formats.errors import TpDeployError
from runtime.kernels import cpu_int4
from runtime.kernels.reference import w4a16_linear
from tests.runtime.kernels.test_w4a16 import make_weight

# The packed kernel multiplies bf16 activations by weights whose scales and zeros it holds in bf16:
# the error is that of bf16 W4A16, measured relative to the largest output (seen: 4e-3 with fp32 x).
PACKED_TOL = 3 * 2.0 ** -7
DENSE_TOL = 1e-5  # dequantize-once: the reference's weights, only the summation order differs
SHAPES = [(1, 576, 192, 64), (8, 576, 1536, 64), (3, 96, 32, 32), (17, 1536, 576, 128), (5, 512, 48, 256)]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("m,k,n,g", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("x_dtype,scale_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.bfloat16)])
def test_packed_and_dequant_once_match_the_reference(m, k, n, g, x_dtype, scale_dtype):
    w = make_weight(k, n, g, scale_dtype, "cpu", seed=k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    bias = torch.randn(n).to(x_dtype)
    ref = w4a16_linear(x, w, bias)
    assert cpu_int4.unsupported(w) is None
    packed = cpu_int4.linear(x, cpu_int4.pack(w), bias)
    assert packed.dtype == x_dtype and _rel(packed, ref) <= PACKED_TOL
    dense = cpu_int4.linear(x, cpu_int4.dequant_once(w, x_dtype), bias)
    assert _rel(dense, ref) <= (DENSE_TOL if x_dtype == torch.float32 else 2 * 2.0 ** -7)


def test_auto_packs_bf16_models_and_keeps_fp32_exact(capsys):
    w = make_weight(576, 192, 64, torch.float16, "cpu")
    assert isinstance(cpu_int4.choose("auto", torch.bfloat16)(w), cpu_int4.PackedInt4)
    assert "torch's packed int4 kernel" in capsys.readouterr().err
    assert isinstance(cpu_int4.choose("auto", torch.float16)(w), cpu_int4.PackedInt4)
    assert isinstance(cpu_int4.choose("auto", torch.float32)(w), torch.Tensor)
    assert "dequantized once at load into float32" in capsys.readouterr().err
    assert isinstance(cpu_int4.choose("packed", torch.float32)(w), cpu_int4.PackedInt4)
    assert cpu_int4.choose("reference", torch.float32)(w) is w


@pytest.mark.parametrize("k,n,g,why", [(576, 200, 64, "200 output features"), (96, 32, 16, "group size 16")])
def test_shapes_the_kernel_cannot_take_fall_back(k, n, g, why, capsys):
    w = make_weight(k, n, g, torch.float16, "cpu")
    assert why in cpu_int4.unsupported(w)
    got = cpu_int4.choose("auto", torch.bfloat16)(w)
    assert isinstance(got, torch.Tensor) and why in capsys.readouterr().err
    with pytest.raises(TpDeployError, match=f"--cpu-int4 packed cannot run this model: {why}"):
        cpu_int4.choose("packed", torch.bfloat16)(w)
    with pytest.raises(TpDeployError, match="--cpu-int4 'fast' is not known"):
        cpu_int4.choose("fast", torch.bfloat16)
