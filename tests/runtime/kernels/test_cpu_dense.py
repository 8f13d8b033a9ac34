"""Dense fp32 linears in oneDNN's blocked layout (``kernels/cpu_dense.py``): the same GEMM as F.linear within
fp32 summation-order error at awkward sizes, with and without bias; chosen for fp32 only, and switchable off."""
import pytest
import torch
import torch.nn.functional as F

from runtime import kernels
from runtime.kernels import cpu_dense

# Relative to the output's scale: both sides are fp32 GEMMs in different summation orders (~1e-6 measured).
RTOL = 2e-5


@pytest.mark.parametrize("m", [1, 3, 17, 130])
@pytest.mark.parametrize("n,k", [(1, 7), (96, 64), (49, 576), (1536, 576)])
def test_packed_linear_is_f_linear(m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w, b = torch.randn(n, k, generator=gen) / k ** 0.5, torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    packed = cpu_dense.pack(w)
    assert (packed.n, packed.k) == (n, k)
    for bias in (None, b):
        want = F.linear(x, w, bias)
        got = cpu_dense.linear(x, packed, bias)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert float((got - want).abs().max()) <= RTOL * max(1.0, float(want.abs().max()))


def test_only_fp32_is_packed_and_plain_turns_it_off(monkeypatch):
    w = torch.randn(8, 16)
    cpu = kernels.select(torch.device("cpu"), dtype=torch.float32)
    assert isinstance(cpu.prepare_dense(w), cpu_dense.PackedDense)
    assert isinstance(kernels.select(torch.device("cpu"), dtype=torch.bfloat16).prepare_dense(w), torch.Tensor)
    monkeypatch.setenv("TPDEPLOY_CPU_DENSE", "plain")
    assert kernels.select(torch.device("cpu"), dtype=torch.float32).prepare_dense(w) is w


def test_model_logits_packed_equal_plain(tiny, tmp_path, monkeypatch):
    """A tiny Qwen2 (q/k/v biases through the packed path) at tp 1: the same logits as with row-major weights."""
    from converter.convert import ConvertOptions, convert
    from runtime.api import LLM

    convert(ConvertOptions(tiny("qwen2", vocab=301, seed=3), tmp_path / "ws", 1))
    prompt = list(range(3, 40))
    logits = {}
    for mode in ("packed", "plain"):
        monkeypatch.setenv("TPDEPLOY_CPU_DENSE", mode)
        with LLM(tmp_path / "ws", device="cpu") as llm:
            assert isinstance(llm.driver.runner.model.layers[0].wqkv, cpu_dense.PackedDense) == (mode == "packed")
            logits[mode] = llm.prompt_logits(prompt)
    torch.testing.assert_close(logits["packed"], logits["plain"], atol=1e-5, rtol=0)
