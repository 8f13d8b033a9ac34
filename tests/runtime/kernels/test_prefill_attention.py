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
from runtime.kernels import reference, torch_attention
from runtime.kernels import write_kv as writes
from runtime.kernels.paged import LayerKV, PagedBatch
from runtime.kv.batch import StepBatch, paged_batch
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
    Case((33,), (5,), hq=2, head_dim=256, bits=4, dtype=BF16),
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
    writes.write_kv(kv, k, v, pb.slots, pb.keys)
    reference.write_kv(ref_kv, k, v, pb.slots, pb.keys)
    scale = case.head_dim ** -0.5
    got = kernels.prefill_attention(q, kv, pb, scale, case.window)
    want = reference.prefill_attention(q, ref_kv, pb, scale, case.window)
    tol = TOL[case.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_window_wider_than_context_is_causal(device):
    case = Case((65, 17), (17, 17), hq=3, bits=8)
    q, kv, pb, k, v = _qkv(case, device)
    writes.write_kv(kv, k, v, pb.slots, pb.keys)
    torch.testing.assert_close(kernels.prefill_attention(q, kv, pb, 0.125, window=1000),
                               kernels.prefill_attention(q, kv, pb, 0.125), atol=0, rtol=0)


@pytest.mark.parametrize("bits,dtype,block_size", [(16, F16, 16), (4, torch.float32, 16), (4, F16, 64)],
                         ids=["fp16", "int4", "int4-bs64"])
def test_unwritten_slots_are_never_read(bits: int, dtype: torch.dtype, block_size: int, device):
    """The runtime's cache is torch.empty: NaN in slots past each context and in block 0 (where table
    padding points) must not reach the output, as it would through a load not masked by length."""
    case = Case((65, 17, 3), (17, 1, 3), hq=3, bits=bits, dtype=dtype, block_size=block_size)
    q, kv, pb, k, v = _qkv(case, device)
    writes.write_kv(kv, k, v, pb.slots, pb.keys)
    want = reference.prefill_attention(q, kv, pb, 0.125)
    kv, pb = _poisoned(kv, pb)
    torch.testing.assert_close(kernels.prefill_attention(q, kv, pb, 0.125), want, atol=TOL[dtype], rtol=TOL[dtype])


def _poisoned(kv: LayerKV, pb: PagedBatch) -> tuple[LayerKV, PagedBatch]:
    """The same cache with NaN in every slot no sequence holds (float data, or int8/int4 params; int4 key
    params of every block not yet full, and every tail row no partial block holds), behind a new all-NaN
    block 0: real table entries move up by one, padding stays 0."""
    bs, nb = kv.block_size, kv.k.shape[0]
    held = torch.zeros(nb * bs, dtype=torch.bool, device=kv.k.device)
    for b, n in enumerate(pb.seq_lens.tolist()):
        pos = torch.arange(n, device=kv.k.device)
        held[pb.block_tables[b].long()[pos // bs] * bs + pos % bs] = True
    free = ~held.view(nb, 1, bs, 1)  # broadcasts over (num_blocks, Hkv, block_size, X)

    def nan_ahead(t, hidden):  # NaN where hidden (None: nowhere; codes cannot be NaN), then (nb, ...) -> (nb + 1, ...)
        if hidden is None:
            return torch.cat([torch.zeros_like(t[:1]), t])
        return torch.cat([torch.full_like(t[:1], float("nan")), t.masked_fill(hidden, float("nan"))])
    p = kv.quantized
    kv = replace(kv, k=nan_ahead(kv.k, None if p else free), v=nan_ahead(kv.v, None if p else free))
    if p:
        key_hidden = ~held.view(nb, bs).all(1).view(nb, 1, 1, 1) if kv.channel_keys else free
        kv = replace(kv, k_params=nan_ahead(kv.k_params, key_hidden), v_params=nan_ahead(kv.v_params, free))
    if kv.channel_keys:
        kv = replace(kv, k_tail=_poisoned_tails(kv.k_tail, pb))
    width = pb.block_tables.shape[1]
    real = torch.arange(width, device=kv.k.device)[None, :] < ((pb.seq_lens + bs - 1) // bs)[:, None]  # (B, width)
    return kv, replace(pb, block_tables=torch.where(real, pb.block_tables + 1, 0).int(), slots=pb.slots + bs)


def _poisoned_tails(tail: torch.Tensor, pb: PagedBatch) -> torch.Tensor:
    """NaN in every tail row that holds no key of a sequence's partial block (unused slots included)."""
    return tail.masked_fill(~_live_tail_rows(tail, pb), float("nan"))


def _live_tail_rows(tail: torch.Tensor, pb: PagedBatch) -> torch.Tensor:
    """(slots, 1, block_size, 1): True where a tail row holds a key of a sequence's partial block."""
    bs = tail.shape[2]
    live = torch.zeros(tail.shape[0], 1, bs, 1, dtype=torch.bool)
    for slot, n in zip(pb.tails.tolist(), pb.seq_lens.tolist()):
        live[slot, 0, :n % bs] = True
    return live.to(tail.device)


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
    writes.write_kv(kv, k, v, pb.slots, pb.keys)
    reference.write_kv(ref, k, v, pb.slots, pb.keys)
    _assert_same_bits(kv, ref)  # also: no other slot touched


def _assert_same_bits(kv: LayerKV, ref: LayerKV) -> None:
    for name in ("k", "v", "k_params", "v_params", "k_tail"):
        got, want = getattr(kv, name), getattr(ref, name)
        assert (got is None) == (want is None), name
        if got is not None:
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name


def _key_rows(t: int, hkv: int, d: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """``_rows`` (moved by ``seed``) plus the hard channels of per-channel quantization: constant over the
    tokens (scale at its floor), a spread far below fp16's resolution at 3000, alternating beyond fp16's range."""
    x = _rows(t, hkv, d, torch.float32, "cpu").roll(seed, 0)
    x[:, 0, 0] = 0.7
    x[:, -1, 1] = 3000 + torch.rand(t, generator=torch.Generator().manual_seed(seed)) * 1e-2
    x[:, 0, d - 1] = torch.where(torch.arange(t) % 2 == 0, 1e5, -1e5)
    if dtype == F16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype).to(device)


# News per sequence, step after step (0: not in the step); contexts after each: [32, 16, 2, 13], [65, 17, 3, 33],
# [66, 18, 4, 34], [81, 32, 64, 64]. Blocks fill from new keys only, from the tail and new keys, or across steps.
KEY_STEPS = [(32, 16, 2, 13), (33, 1, 1, 20), (1, 1, 1, 1), (15, 14, 60, 30)]


def _channel_steps(steps: list[tuple[int, ...]], block_size: int, device) -> list:
    """(PagedBatch, rows) of each step of ``steps`` for sequences that own shuffled blocks and reversed tail
    slots (``paged_cases.step``); rows: where each sequence's new keys sit in a one-step write of them all."""
    finals = [sum(n) for n in zip(*steps)]
    batch, _ = paged_cases.step(finals, finals, block_size)
    starts = torch.tensor([0] + finals).cumsum(0).tolist()
    done, out = [0] * len(finals), []
    for news in steps:
        seqs = [replace(s, new=n, context=done[i] + n) for i, (s, n) in enumerate(zip(batch.seqs, news)) if n]
        rows = torch.cat([torch.arange(starts[i] + done[i], starts[i] + done[i] + n) for i, n in enumerate(news) if n])
        done = [c + n for c, n in zip(done, news)]
        out.append((paged_batch(StepBatch(tuple(seqs)), block_size, device, True), rows))
    return out


def _channel_cache(steps: list[tuple[int, ...]], head_dim: int, block_size: int, device) -> LayerKV:
    finals = [sum(n) for n in zip(*steps)]
    _, num_blocks = paged_cases.step(finals, finals, block_size)
    return paged_cases.empty_cache(4, num_blocks, 2, block_size, head_dim, device)


# every head_dim with both block sizes; the input dtype (only the rounding to fp16 depends on it) taken in turn
CHANNEL_WRITES = [pytest.param(d, bs, dtype, id=f"d{d}-bs{bs}-{_short(dtype)}") for (d, bs), dtype in
                  zip([(d, bs) for d in (16, 64, 80, 128) for bs in (16, 64)], [torch.float32, F16, BF16] * 3)]


@pytest.mark.parametrize("head_dim,block_size,dtype", CHANNEL_WRITES)
def test_channel_keys_write_bit_exact(head_dim: int, block_size: int, dtype: torch.dtype, device):
    """int4 keys, step after step: codes, per-channel params and tails bit-identical to the reference."""
    kv = _channel_cache(KEY_STEPS, head_dim, block_size, device)
    ref = paged_cases.clone(kv)
    for i, (pb, rows) in enumerate(_channel_steps(KEY_STEPS, block_size, device)):
        k = _key_rows(rows.shape[0], 2, head_dim, dtype, device, seed=i)
        v = _rows(rows.shape[0], 2, head_dim, dtype, device)
        writes.write_kv(kv, k, v, pb.slots, pb.keys)
        reference.write_kv(ref, k, v, pb.slots, pb.keys)
        _assert_same_bits(kv, ref)


@pytest.mark.parametrize("block_size", [16, 64], ids=lambda b: f"bs{b}")
def test_channel_keys_chunked_write_equals_one_write(block_size: int, device):
    """A block's codes do not depend on how its keys arrived: the same keys written in three chunks leave
    the codes, params and live tail rows of one write (the chunks' older tail rows are stale, never read)."""
    chunks = [(20, 5, 1, 16), (30, 11, 2, 1), (15, 1, 0, 16)]
    whole = [tuple(sum(n) for n in zip(*chunks))]
    (pb_all, _), = _channel_steps(whole, block_size, device)
    k = _key_rows(pb_all.slots.shape[0], 2, 64, BF16, device, seed=0)
    v = _rows(pb_all.slots.shape[0], 2, 64, BF16, device)
    one = _channel_cache(whole, 64, block_size, device)
    writes.write_kv(one, k, v, pb_all.slots, pb_all.keys)
    chunked = _channel_cache(chunks, 64, block_size, device)
    for pb, rows in _channel_steps(chunks, block_size, device):
        writes.write_kv(chunked, k[rows], v[rows], pb.slots, pb.keys)
    live = _live_tail_rows(one.k_tail, pb_all).expand_as(one.k_tail)
    assert live.any() and torch.equal(chunked.k_tail[live], one.k_tail[live])
    _assert_same_bits(replace(chunked, k_tail=None), replace(one, k_tail=None))


def test_channel_keys_need_the_step_key_writes(device):
    kv, pb, k, v = paged_cases.filled(4, [17, 3], [17, 3], 2, 64, 16, device)
    with pytest.raises(TpDeployError, match="PagedBatch.keys"):
        writes.write_kv(kv, k, v, pb.slots)
    writes.write_kv(kv, k, v, pb.slots, pb.keys)
    q = torch.zeros(k.shape[0], 2, 64, device=device)
    for prefill in (kernels.prefill_attention, reference.prefill_attention, torch_attention.prefill_attention):
        with pytest.raises(TpDeployError, match=r"pass tails \(2,\) int32"):
            prefill(q, kv, replace(pb, tails=None), 0.125)


def test_write_kv_strided_input(device):
    """k and v as views of a fused QKV output (token stride > Hkv * D) are written like contiguous ones."""
    kv, pb, k, v = paged_cases.filled(8, [17], [17], 2, 64, 16, device)
    qkv = torch.cat([k, v, k], dim=1)  # (T, 3 * Hkv, D)
    ref = paged_cases.clone(kv)
    writes.write_kv(kv, qkv[:, :2], qkv[:, 2:4], pb.slots, pb.keys)
    reference.write_kv(ref, k, v, pb.slots, pb.keys)
    assert torch.equal(kv.k, ref.k) and torch.equal(kv.v_params, ref.v_params)


def test_bad_shapes_name_the_problem(device):
    kv, pb, k, v = paged_cases.filled(8, [17], [17], 2, 64, 16, device)
    with pytest.raises(TpDeployError, match="not a multiple of 2 KV heads"):
        kernels.prefill_attention(torch.zeros(17, 3, 64, device=device), kv, pb, 0.125)
    with pytest.raises(TpDeployError, match="head_dim 96"):
        kernels.prefill_attention(torch.zeros(17, 2, 96, device=device), kv, pb, 0.125)
    with pytest.raises(TpDeployError, match="slots"):
        writes.write_kv(kv, k, v, pb.slots.int())


def test_an_unsupported_head_dim_is_named(device):
    case = Case((5,), (5,), head_dim=48)
    q, kv, pb, k, v = _qkv(case, device)
    with pytest.raises(TpDeployError, match=r"head_dim 48 is not supported; the kernels are built for \(16, 32, 64"):
        kernels.prefill_attention(q, kv, pb, 48 ** -0.5)
