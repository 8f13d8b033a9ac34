"""Triton KV write and prefill attention against the torch references (``runtime.kernels.reference``).

Caches come from ``paged_cases``: shuffled blocks, earlier tokens already cached, so a wrong block
lookup, position or mask shows up as a large error, not a rounding one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from formats.errors import TpDeployError
from runtime.kernels import prefill_attention as kernels
from runtime.kernels import reference
from runtime.kernels.paged import LayerKV, PagedBatch
from tests.runtime.kernels import paged_cases

# Output tolerances (outputs are convex mixes of N(0, 1) values, so |out| < ~4):
FP32_TOL = 5e-5  # fp32 dots on both sides; only the summation order differs (seen: 1.2e-6)
FP16_TOL = 4e-3  # P is rounded to fp16 before P @ V, and the output to fp16: ulp 2e-3 at 2..4 (seen: 2e-3)
BF16_TOL = 3e-2  # the same with bf16's 8-bit mantissa: ulp 1.6e-2 at 2..4 (seen: 2.3e-2)
TOL = {torch.float32: FP32_TOL, torch.float16: FP16_TOL, torch.bfloat16: BF16_TOL}
F16, BF16 = torch.float16, torch.bfloat16


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", F16: "fp16", BF16: "bf16"}[dtype]


@dataclass(frozen=True)
class Case:
    """One prefill step: contexts after the step, new tokens per sequence, heads, cache format."""

    contexts: tuple[int, ...]
    news: tuple[int, ...]
    hq: int = 2
    hkv: int = 1
    head_dim: int = 64
    block_size: int = 16
    bits: int = 32  # 4/8: codes; 16/32: float cache in ``cache_dtype``
    dtype: torch.dtype = torch.float32  # q and the values written
    window: int | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        return {32: torch.float32}.get(self.bits, self.dtype)

    def __str__(self) -> str:
        bits = {4: "int4", 8: "int8"}.get(self.bits, _short(self.cache_dtype))
        w = f"-w{self.window}" if self.window else ""
        return (f"ctx{'+'.join(map(str, self.contexts))}-new{'+'.join(map(str, self.news))}-gqa{self.hq // self.hkv}"
                f"-d{self.head_dim}-bs{self.block_size}-{bits}-q{_short(self.dtype)}{w}")


FULL = [  # whole prompts: every key is new this step
    Case((1,), (1,)),
    Case((3, 17, 65), (3, 17, 65), hq=3, head_dim=128),
    Case((1025, 3), (1025, 3), hq=1, block_size=64),
    Case((65, 1, 17), (65, 1, 17), hq=8, block_size=64, bits=8),
    Case((17, 3), (17, 3), hq=4, hkv=2, head_dim=16, bits=4),  # the tiny test models' head_dim
    # the model families' other head dims: 80 and 96 padded to 128 in registers, 256 (Gemma 3)
    Case((17, 3), (17, 3), hq=2, head_dim=80, bits=8),
    Case((9,), (9,), hq=2, head_dim=96, bits=4, dtype=F16),
    Case((9, 2), (9, 2), hq=2, head_dim=256, bits=16, dtype=BF16),
]
CHUNKED = [  # new tokens attend to tokens cached by earlier steps, in every cache precision
    Case((65, 17, 3), (17, 1, 2), hq=3, bits=bits, dtype=dtype, head_dim=d)
    for bits, dtype, d in ((32, torch.float32, 64), (16, F16, 128), (16, BF16, 64), (8, torch.float32, 128),
                           (4, torch.float32, 64), (8, F16, 64), (4, BF16, 128))
] + [
    Case((1025,), (17,), hq=2, hkv=2, block_size=64, bits=4),
    Case((65, 1025, 3), (1, 1, 1), hq=8, head_dim=128, bits=8),  # decode: one new token each
    Case((33, 5), (9, 1), hq=4, hkv=2, head_dim=80, bits=4),
    Case((33,), (5,), hq=2, head_dim=256, bits=8, dtype=F16),
]
WINDOWED = [
    Case((65, 17, 3), (65, 9, 3), hq=3, window=5),
    Case((1025,), (70,), hq=1, block_size=64, bits=8, window=100),  # most key tiles skipped
    Case((65, 33), (17, 33), hq=8, head_dim=128, bits=4, dtype=F16, window=16),
    Case((40,), (40,), hq=2, head_dim=96, bits=16, dtype=F16, window=6),
]


def _qkv(case: Case, device):
    kv, pb, k, v = paged_cases.filled(case.bits, list(case.contexts), list(case.news), case.hkv, case.head_dim,
                                      case.block_size, device, case.cache_dtype)
    k, v = k.to(case.dtype), v.to(case.dtype)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(k.shape[0], case.hq, case.head_dim, generator=g).to(case.dtype).to(device)
    return q, kv, pb, k, v


@pytest.mark.parametrize("case", FULL + CHUNKED + WINDOWED, ids=str)
def test_prefill_matches_reference(case: Case, device):
    q, kv, pb, k, v = _qkv(case, device)
    ref_kv = paged_cases.clone(kv)
    kernels.write_kv(kv, k, v, pb.slots)
    reference.write_kv(ref_kv, k, v, pb.slots)
    scale = case.head_dim ** -0.5
    got = kernels.prefill_attention(q, kv, pb, scale, case.window)
    want = reference.prefill_attention(q, ref_kv, pb, scale, case.window)
    tol = TOL[case.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_window_wider_than_context_is_causal(device):
    case = Case((65, 17), (17, 17), hq=3, bits=8)
    q, kv, pb, k, v = _qkv(case, device)
    kernels.write_kv(kv, k, v, pb.slots)
    torch.testing.assert_close(kernels.prefill_attention(q, kv, pb, 0.125, window=1000),
                               kernels.prefill_attention(q, kv, pb, 0.125), atol=0, rtol=0)


@pytest.mark.parametrize("bits,dtype", [(16, F16), (4, torch.float32)], ids=["fp16", "int4"])
def test_unwritten_slots_are_never_read(bits: int, dtype: torch.dtype, device):
    """The runtime's cache is torch.empty: NaN in slots past each context and in block 0 (where table
    padding points) must not reach the output, as it would through a load not masked by length."""
    case = Case((65, 17, 3), (17, 1, 3), hq=3, bits=bits, dtype=dtype)
    q, kv, pb, k, v = _qkv(case, device)
    kernels.write_kv(kv, k, v, pb.slots)
    want = reference.prefill_attention(q, kv, pb, 0.125)
    kv, pb = _poisoned(kv, pb)
    torch.testing.assert_close(kernels.prefill_attention(q, kv, pb, 0.125), want, atol=TOL[dtype], rtol=TOL[dtype])


def _poisoned(kv: LayerKV, pb: PagedBatch) -> tuple[LayerKV, PagedBatch]:
    """The same cache with NaN in every slot no sequence holds (float data, or int8/int4 params),
    behind a new all-NaN block 0: real table entries move up by one, padding stays 0."""
    bs, nb = kv.block_size, kv.k.shape[0]
    held = torch.zeros(nb * bs, dtype=torch.bool, device=kv.k.device)
    for b, n in enumerate(pb.seq_lens.tolist()):
        pos = torch.arange(n, device=kv.k.device)
        held[pb.block_tables[b].long()[pos // bs] * bs + pos % bs] = True
    free = ~held.view(nb, 1, bs, 1)  # broadcasts over (num_blocks, Hkv, block_size, X)

    def nan_ahead(t, poison):  # (nb, ...) -> (nb + 1, ...)
        t = t.masked_fill(free, float("nan")) if poison else t
        return torch.cat([torch.full_like(t[:1], float("nan") if poison else 0), t])
    p = kv.quantized
    params = (nan_ahead(kv.k_params, True), nan_ahead(kv.v_params, True)) if p else (None, None)
    kv = replace(kv, k=nan_ahead(kv.k, not p), v=nan_ahead(kv.v, not p), k_params=params[0], v_params=params[1])
    width = pb.block_tables.shape[1]
    real = torch.arange(width, device=kv.k.device)[None, :] < ((pb.seq_lens + bs - 1) // bs)[:, None]  # (B, width)
    return kv, replace(pb, block_tables=torch.where(real, pb.block_tables + 1, 0).int(), slots=pb.slots + bs)


def _rows(t: int, hkv: int, d: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Random rows plus the hard ones: constant, beyond fp16's range, tiny spread around a big offset."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t, hkv, d, generator=g) * 3
    x[0, 0] = 0.7  # constant: scale hits its 2**-14 floor
    x[1, 0] = torch.linspace(-1e5, 1e5, d)  # clamped to +-65504 before min/max
    x[2, 0] = 3000 + torch.rand(d, generator=g) * 1e-2  # spread far below fp16 resolution at 3000
    x[3, -1] = torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0)  # int4 nibble order: low/high differ
    if dtype == F16:
        x = x.clamp(-6e4, 6e4)  # finite in fp16 (fp32 and bf16 keep the +-1e5 row)
    return x.to(dtype).to(device)


WRITE_FORMATS = [(8, torch.float32), (8, F16), (8, BF16), (4, torch.float32), (4, F16), (4, BF16),
                 (32, torch.float32), (16, F16), (16, BF16)]


@pytest.mark.parametrize("bits,dtype", WRITE_FORMATS, ids=lambda p: _short(p) if isinstance(p, torch.dtype) else p)
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 64)], ids=["d64-bs16", "d128-bs64"])
def test_write_kv_bit_exact(bits: int, dtype: torch.dtype, head_dim: int, block_size: int, device):
    kv, pb, _, _ = paged_cases.filled(bits, [65, 17, 3], [33, 17, 1], 2, head_dim, block_size, device,
                                      {32: torch.float32}.get(bits, dtype))
    t = pb.slots.shape[0]
    k, v = _rows(t, 2, head_dim, dtype, device), _rows(t, 2, head_dim, dtype, device).flip(0)
    ref = paged_cases.clone(kv)
    kernels.write_kv(kv, k, v, pb.slots)
    reference.write_kv(ref, k, v, pb.slots)
    assert torch.equal(kv.k, ref.k) and torch.equal(kv.v, ref.v)  # also: no other slot touched
    if kv.quantized:
        assert torch.equal(kv.k_params, ref.k_params) and torch.equal(kv.v_params, ref.v_params)


def test_write_kv_strided_input(device):
    """k and v as views of a fused QKV output (token stride > Hkv * D) are written like contiguous ones."""
    kv, pb, k, v = paged_cases.filled(8, [17], [17], 2, 64, 16, device)
    qkv = torch.cat([k, v, k], dim=1)  # (T, 3 * Hkv, D)
    ref = paged_cases.clone(kv)
    kernels.write_kv(kv, qkv[:, :2], qkv[:, 2:4], pb.slots)
    reference.write_kv(ref, k, v, pb.slots)
    assert torch.equal(kv.k, ref.k) and torch.equal(kv.v_params, ref.v_params)


def test_bad_shapes_name_the_problem(device):
    kv, pb, k, v = paged_cases.filled(8, [17], [17], 2, 64, 16, device)
    with pytest.raises(TpDeployError, match="not a multiple of 2 KV heads"):
        kernels.prefill_attention(torch.zeros(17, 3, 64, device=device), kv, pb, 0.125)
    with pytest.raises(TpDeployError, match="head_dim 96"):
        kernels.prefill_attention(torch.zeros(17, 2, 96, device=device), kv, pb, 0.125)
    with pytest.raises(TpDeployError, match="slots"):
        kernels.write_kv(kv, k, v, pb.slots.int())


def test_an_unsupported_head_dim_is_named(device):
    case = Case((5,), (5,), head_dim=48)
    q, kv, pb, k, v = _qkv(case, device)
    with pytest.raises(TpDeployError, match=r"head_dim 48 is not supported; the kernels are built for \(16, 32, 64, 80"):
        kernels.prefill_attention(q, kv, pb, 48 ** -0.5)
