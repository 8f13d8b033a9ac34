"""Dense fp32 linears in packed layouts (``kernels/cpu_dense.py``, the native GEMM ``cpu_gemm.c`` and oneDNN's):
the same GEMM as F.linear within fp32 summation-order error at awkward sizes, with and without bias; chosen for
fp32 only, switchable, and a machine that cannot build the native one falls back to oneDNN."""
import os
import stat

import pytest
import torch
import torch.nn.functional as F

from formats.errors import TpDeployError
from runtime import kernels
from runtime.kernels import cpu_dense, cpu_native

# Relative to the output's scale: both sides are fp32 GEMMs in different summation orders (~1e-6 measured).
RTOL = 2e-5
PACKERS = {"native": cpu_dense.pack_native, "onednn": cpu_dense.pack}


@pytest.mark.parametrize("layout", PACKERS)
@pytest.mark.parametrize("m", [1, 3, 8, 17, 130])
@pytest.mark.parametrize("n,k", [(1, 7), (96, 64), (49, 576), (1536, 576), (33, 1)])
def test_packed_linear_is_f_linear(layout, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w, b = torch.randn(n, k, generator=gen) / k ** 0.5, torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    packed = PACKERS[layout](w)
    assert (packed.n, packed.k, packed.layout) == (n, k, layout)
    for bias in (None, b):
        want = F.linear(x, w, bias)
        got = cpu_dense.linear(x, packed, bias)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert float((got - want).abs().max()) <= RTOL * max(1.0, float(want.abs().max()))


def test_native_takes_any_leading_shape_and_strides_and_no_rows():
    w = torch.randn(40, 24)
    packed = cpu_dense.pack_native(w)
    x = torch.randn(24, 2, 3).permute(1, 2, 0)  # (2, 3, 24), not contiguous
    torch.testing.assert_close(cpu_dense.linear(x, packed), F.linear(x, w), atol=1e-5, rtol=0)
    assert cpu_dense.linear(torch.empty(0, 24), packed).shape == (0, 40)
    with pytest.raises(TypeError, match="float32"):
        cpu_dense.linear(x.double(), packed)


def test_native_results_do_not_depend_on_the_thread_count():
    """Each output is one thread's k-ordered sum: bit-identical at 1 and 2 threads (oneDNN promises no such)."""
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(1000, 576, generator=gen), torch.randn(9, 576, generator=gen)
    packed, threads = cpu_dense.pack_native(w), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_dense.linear(x, packed)
        torch.set_num_threads(2)
        two = cpu_dense.linear(x, packed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_only_fp32_is_packed_and_each_mode_is_chosen(monkeypatch):
    w = torch.randn(8, 16)
    cpu = kernels.select(torch.device("cpu"), dtype=torch.float32)
    assert cpu.prepare_dense(w).layout == "native"  # this machine has a compiler: the default
    assert isinstance(kernels.select(torch.device("cpu"), dtype=torch.bfloat16).prepare_dense(w), torch.Tensor)
    for mode in ("native", "onednn"):
        monkeypatch.setenv("TPDEPLOY_CPU_DENSE", mode)
        assert kernels.select(torch.device("cpu"), dtype=torch.float32).prepare_dense(w).layout == mode
    monkeypatch.setenv("TPDEPLOY_CPU_DENSE", "plain")
    assert kernels.select(torch.device("cpu"), dtype=torch.float32).prepare_dense(w) is w
    monkeypatch.setenv("TPDEPLOY_CPU_DENSE", "mkl")
    with pytest.raises(TpDeployError, match="TPDEPLOY_CPU_DENSE='mkl' is not known"):
        kernels.select(torch.device("cpu"), dtype=torch.float32)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """cpu_native.load() as on a machine that has not built the library: an empty cache directory."""
    monkeypatch.setenv("TPDEPLOY_KERNEL_CACHE", str(tmp_path / "kernels"))
    cpu_native.load.cache_clear()
    yield tmp_path / "kernels"
    cpu_native.load.cache_clear()  # later tests load the machine's own build again


def test_the_library_is_built_once_into_the_cache(fresh_build):
    cpu_native.load()
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left beside it
    mtime = built[0].stat().st_mtime_ns
    cpu_native.load.cache_clear()
    cpu_native.load()
    assert list(fresh_build.iterdir()) == built and built[0].stat().st_mtime_ns == mtime


def test_a_failed_build_falls_back_to_onednn_and_forcing_native_says_why(fresh_build, tmp_path, monkeypatch):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\n"
                      "echo 'cpu_gemm.c:1: error: no vectors here' >&2; exit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(broken))
    w = torch.randn(8, 16)
    assert kernels.select(torch.device("cpu"), dtype=torch.float32).prepare_dense(w).layout == "onednn"
    assert not fresh_build.exists() or not os.listdir(fresh_build)  # the failed build left nothing
    monkeypatch.setenv("TPDEPLOY_CPU_DENSE", "native")
    with pytest.raises(TpDeployError, match="exited 1: cpu_gemm.c:1: error: no vectors here"):
        kernels.select(torch.device("cpu"), dtype=torch.float32)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu_native.load.cache_clear()
    with pytest.raises(TpDeployError, match="no C compiler"):
        kernels.select(torch.device("cpu"), dtype=torch.float32)


def test_model_logits_packed_equal_plain(tiny, tmp_path, monkeypatch):
    """A tiny Qwen2 (q/k/v biases through the packed path) at tp 1: the same logits in every layout."""
    from converter.convert import ConvertOptions, convert
    from runtime.api import LLM

    convert(ConvertOptions(tiny("qwen2", vocab=301, seed=3), tmp_path / "ws", 1))
    prompt = list(range(3, 40))
    logits = {}
    for mode in ("native", "onednn", "plain"):
        monkeypatch.setenv("TPDEPLOY_CPU_DENSE", mode)
        with LLM(tmp_path / "ws", device="cpu") as llm:
            wqkv = llm.driver.runner.model.layers[0].wqkv
            assert isinstance(wqkv, torch.Tensor) if mode == "plain" else wqkv.layout == mode
            logits[mode] = llm.prompt_logits(prompt)
    for mode in ("native", "onednn"):
        torch.testing.assert_close(logits[mode], logits["plain"], atol=1e-5, rtol=0)
