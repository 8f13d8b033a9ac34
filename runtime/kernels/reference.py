"""Plain-torch references: the math the runtime's CPU path runs and the Triton kernels must match.

* ``w4a16_linear``: x @ dequant(W) over the canonical int4 layout (``formats.int4``).
* ``write_kv``: quantize (int8/int4) or cast the step's K/V and scatter them into their slots.
* ``prefill_attention``: causal GQA attention of packed variable-length queries over each
  sequence's paged cache (cached tokens and this step's alike: chunked prefill).
* ``decode_attention``: one query per sequence over its block table, all sequences in one batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from formats import int4
from runtime.kernels.paged import (
    TAIL_DTYPE,
    KeyWrites,
    LayerKV,
    PagedBatch,
    check_keys,
    check_tails,
    dequantize,
    dequantize_channels,
    quantize,
    quantize_channels,
    with_tails,
)


@dataclass(frozen=True)
class Int4Weight:
    """One int4 linear in the canonical layout (``formats.int4``): W is (K, N) after dequantization."""

    qweight: torch.Tensor  # (K/8, N) int32
    scales: torch.Tensor  # (K/G, N)
    zeros: torch.Tensor  # (K/G, N) uint8
    group_size: int


def w4a16_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ dequant(W) (K, N) (+ bias): dequantized in the scales' dtype, then in x's dtype."""
    weight = int4.dequantize(w.qweight, w.scales, w.zeros, w.group_size).to(x.dtype)  # (K, N)
    out = x @ weight
    return out if bias is None else out + bias


def write_kv(kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, keys: KeyWrites | None = None) -> None:
    """Store k, v (T, Hkv, D) at ``slots`` (T,) = block * block_size + offset, in the cache's precision;
    int4 keys go where ``keys`` (``PagedBatch.keys``) says instead."""
    pairs = ((kv.k, kv.k_params, k), (kv.v, kv.v_params, v))
    if kv.channel_keys:
        write_channel_keys(kv, k, check_keys(keys))
        pairs = pairs[1:]
    blocks, offsets = slots // kv.block_size, slots % kv.block_size  # advanced indices: (T, Hkv, X) views
    for data, params, x in pairs:
        if kv.quantized:
            codes, p = quantize(x, kv.bits)
            data[blocks, :, offsets] = codes
            params[blocks, :, offsets] = p
        else:
            data[blocks, :, offsets] = x.to(data.dtype)


def write_channel_keys(kv: LayerKV, k: torch.Tensor, keys: KeyWrites) -> None:
    """Quantize the blocks this step fills per channel, then leave the other new keys in their tails. Keys are
    rounded to float16 first, as a tail holds them, so a block's codes do not depend on how it was filled."""
    x = k.float().clamp(-65504, 65504).to(TAIL_DTYPE)
    bs = kv.block_size
    if keys.full_blocks.numel():
        src = keys.full_src
        old = (-1 - src).clamp(min=0)
        blocks = torch.where((src >= 0)[..., None, None], x[src.clamp(min=0)], kv.k_tail[old // bs, :, old % bs])
        codes, params = quantize_channels(blocks.transpose(1, 2), kv.bits)  # (C, Hkv, bs, D) per channel
        kv.k[keys.full_blocks], kv.k_params[keys.full_blocks] = codes, params
    dst = keys.tail_dst
    kv.k_tail[dst // bs, :, dst % bs] = x[keys.tail_rows]


def gather_kv(kv: LayerKV, table: torch.Tensor, n: int, dtype: torch.dtype,
              tail: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` tokens of one sequence as (Hkv, n, D) keys and values in ``dtype`` (``tail``: its slot
    in an int4 cache)."""
    blocks = table[: -(-n // kv.block_size)].long()
    v = _gather(kv.v, kv.v_params, blocks, n, kv.bits, dtype)
    if not kv.channel_keys:
        return _gather(kv.k, kv.k_params, blocks, n, kv.bits, dtype), v
    k = dequantize_channels(kv.k[blocks], kv.k_params[blocks], kv.bits, dtype)[None]  # (1, nb, Hkv, bs, D)
    k = with_tails(k, kv.k_tail, torch.tensor([n]), torch.tensor([tail]))[0]
    return k.transpose(0, 1).flatten(1, 2)[:, :n], v


def _gather(data, params, blocks, n, bits, dtype) -> torch.Tensor:
    def flat(t):  # (nb, H, bs, X) -> (H, nb * bs, X)[:, :n]
        return t[blocks].transpose(0, 1).flatten(1, 2)[:, :n]
    if params is None:
        return flat(data).to(dtype)
    return dequantize(flat(data), flat(params), bits, dtype)


def allowed(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window, as Mistral: key j visible from query i iff i - window < j <= i)."""
    ok = kpos[None, :] <= qpos[:, None]
    if window is not None:
        ok &= kpos[None, :] > qpos[:, None] - window
    return ok


def prefill_attention(q: torch.Tensor, kv: LayerKV, pb: PagedBatch, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """q (T, Hq, D) packed by ``pb.query_start`` -> (T, Hq, D); new tokens sit at the end of each context."""
    out = torch.empty_like(q)
    starts, lens = pb.query_start.tolist(), pb.seq_lens.tolist()
    check_tails(kv, pb.tails, len(lens), "prefill_attention")
    tails = pb.tails.tolist() if kv.channel_keys else [-1] * len(lens)
    for b, n in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        k, v = gather_kv(kv, pb.block_tables[b], n, q.dtype, tails[b])
        qpos = torch.arange(n - (e - s), n, device=q.device)
        mask = allowed(qpos, torch.arange(n, device=q.device), window)
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s:e] = o.transpose(0, 1)
    return out


def decode_attention(q: torch.Tensor, kv: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     window: int | None = None, tails: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, D), one query per sequence at position seq_len - 1 -> (B, Hq, D); one batched gather
    (``tails``: each sequence's slot in an int4 cache)."""
    width = -(-int(seq_lens.max()) // kv.block_size)
    tables = block_tables[:, :width].long()
    v = _gather_batch(kv.v, kv.v_params, tables, kv.bits, q.dtype)
    if kv.channel_keys:
        k = dequantize_channels(kv.k[tables], kv.k_params[tables], kv.bits, q.dtype)  # (B, W, Hkv, bs, D)
        check_tails(kv, tails, seq_lens.shape[0], "decode_attention")
        k = with_tails(k, kv.k_tail, seq_lens, tails).transpose(1, 2).flatten(2, 3)
    else:
        k = _gather_batch(kv.k, kv.k_params, tables, kv.bits, q.dtype)
    kpos = torch.arange(k.shape[2], device=q.device)
    last = (seq_lens.long() - 1)[:, None]
    mask = kpos[None, :] <= last  # (B, L)
    # Slots past a sequence's length were never written (the cache is torch.empty): zero them, since
    # a NaN there would survive the -inf mask through the 0 * NaN of the value product.
    k, v = (torch.where(mask[:, None, :, None], t, 0) for t in (k, v))
    if window is not None:
        mask &= kpos[None, :] > last - window
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return o[:, :, 0]


def _gather_batch(data, params, tables, bits, dtype) -> torch.Tensor:
    def flat(t):  # (nb, H, bs, X)[tables] -> (B, H, width * bs, X)
        return t[tables].transpose(1, 2).flatten(2, 3)
    if params is None:
        return flat(data).to(dtype)
    return dequantize(flat(data), flat(params), bits, dtype)

