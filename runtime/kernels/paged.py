"""What the kernels read and write: one layer's paged storage, a step's device view, and the
quantized element format (codes plus fp16 ``[scale, zero]``), whose torch reference is here.

The layout and the format are described in ``runtime/kv/format.py`` and ``docs/kv-cache.md``; the
cache (``runtime/kv``) owns the storage and builds the views, the kernels only read these types.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from formats.errors import TpDeployError

PARAM_DTYPE = torch.float16  # scale and zero: 2 bytes each keeps int8 at >= 1.85x fp16's tokens at D=64
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # int4 keys' per-channel range shrunk by the best (quantize_channels)
TAIL_DTYPE = torch.float16  # int4 keys of a partial block, until it fills (keys are clamped to fp16's range anyway)
_FP16_MAX = 65504.0
_MIN_SCALE = 2.0 ** -14  # smallest normal fp16: a constant row still dequantizes exactly to its value


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache. k, v: (num_blocks, kv_heads, block_size, packed_dim); params (…, 2) fp16 or None."""

    k: torch.Tensor
    v: torch.Tensor
    k_params: torch.Tensor | None
    v_params: torch.Tensor | None
    bits: int  # 4 or 8: codes + params; 16 or 32: plain floats
    # int4 keys: params (num_blocks, kv_heads, head_dim, 2) per channel of each full block, and each
    # sequence's partial last block in float16 here, (tail slots, kv_heads, block_size, head_dim)
    k_tail: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def channel_keys(self) -> bool:
        return self.k_tail is not None

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)


@dataclass(frozen=True)
class KeyWrites:
    """Where a step's keys go in a channel-key cache (``LayerKV.k_tail``): blocks the step fills are
    quantized whole, per channel; keys of a block still partial after the step go to the tail."""

    tail_rows: torch.Tensor  # (Tt,) int64: rows of the packed step that land in a partial block
    tail_dst: torch.Tensor  # (Tt,) int64: their tail rows, slot * block_size + offset
    full_blocks: torch.Tensor  # (C,) int64: cache blocks this step fills
    # (C, block_size) int64: where each key of those blocks is now: a row of the step (>= 0), or the
    # tail row ``-1 - src`` an earlier step left it in
    full_src: torch.Tensor


@dataclass(frozen=True)
class PagedBatch:
    """A StepBatch as device tensors: the kernels' view of a step."""

    block_tables: torch.Tensor  # (B, max_blocks) int32; rows padded with block 0 (never read: masked by length)
    seq_lens: torch.Tensor  # (B,) int32: context after this step
    query_start: torch.Tensor  # (B + 1,) int32: row of each sequence's first new token in the packed step
    slots: torch.Tensor  # (T,) int64: block * block_size + offset of every new token
    max_query_len: int
    max_seq_len: int
    decode_only: bool
    # A step mixing prompt chunks with decodes runs as two kernel calls: (decode token rows, their batch)
    # and (prefill token rows, their batch), so decoding rows keep the batched decode path.
    split: tuple[torch.Tensor, PagedBatch, torch.Tensor, PagedBatch] | None = None
    tails: torch.Tensor | None = None  # (B,) int32: each sequence's tail slot (channel-key caches only)
    keys: KeyWrites | None = None  # the whole step's key writes (channel-key caches only)


def check_tails(kv: LayerKV, tails: torch.Tensor | None, batch: int, who: str) -> None:
    """An int4 cache needs each sequence's tail slot: ``tails`` (B,) int32 (``PagedBatch.tails``)."""
    if not kv.channel_keys:
        return
    if tails is None or tails.shape != (batch,) or tails.dtype != torch.int32:
        got = None if tails is None else f"{tuple(tails.shape)} {tails.dtype}"
        raise TpDeployError(f"{who}: an int4 cache keeps each sequence's partial block of keys in a tail slot; "
                            f"pass tails ({batch},) int32 (PagedBatch.tails), got {got}")


def check_keys(keys: KeyWrites | None) -> KeyWrites:
    """An int4 cache's write needs the step's ``KeyWrites`` (``PagedBatch.keys``)."""
    if keys is None:
        raise TpDeployError("write_kv: an int4 cache stores keys per block; pass the step's PagedBatch.keys")
    return keys


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> codes uint8 (..., D or D/2) and params float16 (..., 2) = [scale, zero]."""
    qmax = (1 << bits) - 1
    x32 = x.float().clamp(-_FP16_MAX, _FP16_MAX)
    lo, hi = x32.amin(-1, keepdim=True), x32.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(_MIN_SCALE, _FP16_MAX).to(PARAM_DTYPE)
    zero = lo.to(PARAM_DTYPE)
    codes = torch.floor((x32 - zero.float()) / scale.float() + 0.5).clamp(0, qmax).to(torch.uint8)
    return _pack(codes, bits), torch.cat([scale, zero], dim=-1)


def quantize_channels(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., N, D) -> codes (..., N, D or D/2) and params (..., D, 2): one scale and zero per channel over
    the N tokens, its range clipped by the first of ``CLIP_RATIOS`` with the least squared error.

    A channel's range over a block is set by its one or two most extreme tokens; shrinking it about its
    middle trades their error for finer steps for all the others. Per ratio r (ratio 1 is plain min-max):
    ``span = (hi - lo) * r``, ``lo_r = lo + ((hi - lo) - span) * 0.5``, then ``quantize``'s arithmetic
    with ``scale = fp16(span / qmax)``, ``zero = fp16(lo_r)``; the error is summed over the tokens in fp32."""
    qmax = (1 << bits) - 1
    x32 = x.float().clamp(-_FP16_MAX, _FP16_MAX)
    lo, hi = x32.amin(-2, keepdim=True), x32.amax(-2, keepdim=True)
    best = None
    for r in CLIP_RATIOS:
        span = (hi - lo) * r
        scale = (span / qmax).clamp(_MIN_SCALE, _FP16_MAX).to(PARAM_DTYPE).float()
        zero = (lo + ((hi - lo) - span) * 0.5).to(PARAM_DTYPE).float()
        codes = torch.floor((x32 - zero) / scale + 0.5).clamp(0, qmax)
        err = ((codes * scale + zero - x32) ** 2).sum(-2, keepdim=True)
        if best is None:
            best = codes, scale, zero, err
            continue
        better = err < best[3]
        best = tuple(torch.where(better, new, old) for new, old in zip((codes, scale, zero, err), best))
    codes, scale, zero, _ = best
    return _pack(codes.to(torch.uint8), bits), torch.stack([scale, zero], dim=-1).squeeze(-3).to(PARAM_DTYPE)


def dequantize(codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """codes (..., D or D/2) uint8 and params (..., 2) -> values (..., D) in ``dtype`` (math in fp32)."""
    codes = _unpack(codes, bits)
    p = params.float()
    return (codes.float() * p[..., :1] + p[..., 1:]).to(dtype)


def with_tails(x: torch.Tensor, k_tail: torch.Tensor, lens: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
    """x (B, W, Hkv, bs, D): keys gathered through each sequence's table; the block holding a sequence's
    partial last block is replaced (in place) by its tail slot: the int4 codes there are not written yet."""
    bs = x.shape[3]
    lens, tails = lens.long(), tails.long()
    part = (lens % bs != 0).nonzero().squeeze(1)
    if part.numel():
        x[part, lens[part] // bs] = k_tail[tails[part]].to(x.dtype)
    return x


def dequantize_channels(codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """codes (..., N, D or D/2) and per-channel params (..., D, 2) -> values (..., N, D) in ``dtype``."""
    codes = _unpack(codes, bits)
    p = params.float().unsqueeze(-3)  # (..., 1, D, 2): the same for every token
    return (codes.float() * p[..., 0] + p[..., 1]).to(dtype)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int4: elements 2j and 2j + 1 of the last dim into the low and high nibble of byte j."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2) if bits == 4 else codes
