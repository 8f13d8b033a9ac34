"""The CPU attention path: all of a step's sequences in one batched computation over the paged cache.

``reference.py`` stays the oracle (it attends one prompt at a time, and is what these are tested
against); these are what ``kernels.select`` runs on CPU. Same math, in fewer and larger operations:

* Gather: the blocks of every sequence's table at once, ``index_select`` on the block axis of the
  cache (whole contiguous blocks copied, no per-token indexing): ``(B, W, Hkv, bs, D)`` for ``W``
  blocks per table (padded with block 0); int8/int4 codes are dequantized after the gather.
* Decode: one query per sequence. Scores are batched matmuls over (sequence, block, KV head) of the
  query heads sharing that KV head, ``(G, D) @ (D, bs)`` (GQA without repeating K/V; the gathered
  layout is used as is); one masked softmax over the ``W * bs`` keys of each row; then ``P @ V`` per
  block, summed over blocks. Math in float32 (like the Triton kernels' accumulators), output in q's dtype.
* Prefill: sequences grouped so that padding at most doubles the work and the gathered keys stay
  bounded (``_groups``; a long prompt goes alone, as in the reference), each group one
  ``scaled_dot_product_attention`` call over ``(Bg, Hkv, G * Tq, L)``: queries are padded to the
  group's longest chunk and the ``G`` heads of a KV head stacked on the query axis; a boolean mask
  gives each row its causal (and sliding-window) keys of its own sequence.

Slots past a sequence's length (table padding, the tail of its last block) are masked out, but the
cache is ``torch.empty``: they may hold anything. Decode replaces their scores (``masked_fill``, which
overwrites NaN and inf too) and zeroes non-finite values of the gathered V (``nan_to_num_``, one cheap
pass), since ``0 * NaN`` would survive ``P @ V`` (a finite value times 0 is 0; a non-finite value in a
*written* slot would already have made the model's output meaningless). Prefill zeroes those slots of
K and V outright: SDPA adds its mask to the scores, and a huge key makes an infinite score there.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

from runtime.kernels.paged import LayerKV, PagedBatch, check_tails, dequantize, dequantize_channels, with_tails

# Prefill: a group's padded score count (rows x keys) may reach this multiple of the sum of its
# sequences' own; beyond it a new group starts (padding is computed, then thrown away).
PAD_SLACK = 2.0
PAD_FREE = 1 << 16  # below this many padded scores a group never splits: the call costs more than the work
# Keys gathered for one group (size x longest context), so its K/V copies stay the size of one long
# sequence's (which the per-sequence reference gathers too), whatever the batch.
GROUP_KEYS = 1 << 15


def decode_attention(q: torch.Tensor, kv: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     window: int | None = None, tails: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, D), one query per sequence at position seq_len - 1 -> (B, Hq, D) (``tails``: each
    sequence's slot in an int4 cache)."""
    b, hq, d = q.shape
    hkv, bs = kv.k.shape[1], kv.block_size
    lens = seq_lens.long()
    width = -(-int(lens.max()) // bs)
    blocks = block_tables[:, :width].long().flatten()  # (B * W,)
    k = _keys(kv, blocks, torch.float32, b, lens, tails)  # (B, W, Hkv, bs, D)
    v = _gather(kv.v, kv.v_params, blocks, kv.bits, torch.float32).view(b, width, hkv, bs, d)
    hidden = _hidden(lens - 1, width * bs, window)  # (B, L): keys a query must not see
    qg = q.float().reshape(b, 1, hkv, hq // hkv, d)  # (B, 1, Hkv, G, D): broadcast over blocks
    s = torch.matmul(qg, k.transpose(-1, -2))  # (B, W, Hkv, G, bs)
    s = s.permute(0, 2, 3, 1, 4).reshape(b, hkv, hq // hkv, width * bs) * scale  # (B, Hkv, G, L)
    s.masked_fill_(hidden[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).view(b, hkv, hq // hkv, width, bs).permute(0, 3, 1, 2, 4)  # (B, W, Hkv, G, bs)
    o = torch.matmul(p, v.nan_to_num_(0.0, 0.0, 0.0)).sum(1)  # (B, Hkv, G, D)
    return o.reshape(b, hq, d).to(q.dtype)


def prefill_attention(q: torch.Tensor, kv: LayerKV, pb: PagedBatch, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """q (T, Hq, D) packed by ``pb.query_start`` -> (T, Hq, D); new tokens sit at the end of each context."""
    out = torch.empty_like(q)
    starts, lens = pb.query_start.tolist(), pb.seq_lens.tolist()
    qlens = [e - s for s, e in pairwise(starts)]
    for group in _groups(qlens, lens):
        _prefill_group(q, kv, pb, group, scale, window, out)
    return out


def _prefill_group(q: torch.Tensor, kv: LayerKV, pb: PagedBatch, group: list[int], scale: float,
                   window: int | None, out: torch.Tensor) -> None:
    """Attend the sequences ``group`` (indices into ``pb``) in one call; writes their rows of ``out``."""
    dev, (hq, d) = q.device, q.shape[1:]
    hkv, bs = kv.k.shape[1], kv.block_size
    idx = torch.tensor(group, device=dev)
    lens = pb.seq_lens[idx].long()  # (Bg,)
    first = pb.query_start[idx].long()  # (Bg,) row of each sequence's first new token
    qlens = pb.query_start[idx + 1].long() - first  # (Bg,)
    b, tq, width = len(group), int(qlens.max()), -(-int(lens.max()) // bs)
    blocks = pb.block_tables[idx, :width].long().flatten()  # (Bg * W,)

    kpos = torch.arange(width * bs, device=dev)
    written = (kpos[None, :] < lens[:, None])[:, None, :, None]  # (Bg, 1, L, 1)

    def flat(x) -> torch.Tensor:  # (Bg * W, Hkv, bs, D) -> (Bg, Hkv, L, D), zero past each sequence's length
        x = x.view(b, width, hkv, bs, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, width * bs, d)
        return torch.where(written, x, 0)
    k = flat(_keys(kv, blocks, q.dtype, b, lens, None if pb.tails is None else pb.tails[idx]))
    v = flat(_gather(kv.v, kv.v_params, blocks, kv.bits, q.dtype))
    t = torch.arange(tq, device=dev)
    real = t[None, :] < qlens[:, None]  # (Bg, Tq): rows that are tokens (the rest is padding)
    rows = first[:, None] + torch.minimum(t[None, :], qlens[:, None] - 1)  # (Bg, Tq): padding repeats a row
    qpos = (lens - qlens)[:, None] + t[None, :]  # (Bg, Tq): position of each query in its sequence
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < lens[:, None, None])  # (Bg, Tq, L)
    if window is not None:
        mask &= kpos[None, None, :] > qpos[:, :, None] - window
    g = hq // hkv
    qq = q[rows].view(b, tq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * tq, d)  # (Bg, Hkv, G*Tq, D)
    mask = mask[:, None, None].expand(b, 1, g, tq, width * bs).reshape(b, 1, g * tq, width * bs)
    o = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=scale)  # (Bg, Hkv, G*Tq, D)
    o = o.view(b, hkv, g, tq, d).permute(0, 3, 1, 2, 4).reshape(b, tq, hq, d)  # (Bg, Tq, Hq, D)
    out[rows[real]] = o[real]


def _groups(qlens: list[int], lens: list[int]) -> list[list[int]]:
    """Sequences (by index) in groups whose padded scores stay within ``PAD_SLACK`` x their own (a group's
    padded work is size x longest chunk x longest context) and whose gathered keys within ``GROUP_KEYS``."""
    groups: list[list[int]] = []
    group: list[int] = []
    own = tq = tk = 0
    for i in sorted(range(len(lens)), key=lambda i: (lens[i], qlens[i])):
        q2, k2, own2 = max(tq, qlens[i]), max(tk, lens[i]), own + qlens[i] * lens[i]
        padded = (len(group) + 1) * q2 * k2
        wasteful = padded > PAD_FREE and padded > PAD_SLACK * own2
        if group and (wasteful or (len(group) + 1) * k2 > GROUP_KEYS):
            groups.append(group)
            group, q2, k2, own2 = [], qlens[i], lens[i], qlens[i] * lens[i]
        group.append(i)
        own, tq, tk = own2, q2, k2
    return groups + [group] if group else groups


def _hidden(last: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """(B, L) True where key position j is not visible from the query at ``last`` (causal, window)."""
    kpos = torch.arange(length, device=last.device)
    hidden = kpos[None, :] > last[:, None]
    if window is not None:
        hidden |= kpos[None, :] <= last[:, None] - window
    return hidden


def _keys(kv: LayerKV, blocks: torch.Tensor, dtype: torch.dtype, b: int, lens: torch.Tensor,
          tails: torch.Tensor | None) -> torch.Tensor:
    """Keys of ``b`` sequences' tables (``blocks``, B * W) as (B, W, Hkv, bs, D) values in ``dtype``."""
    if not kv.channel_keys:
        x = _gather(kv.k, kv.k_params, blocks, kv.bits, dtype)
        return x.view(b, -1, *x.shape[1:])
    x = dequantize_channels(kv.k.index_select(0, blocks), kv.k_params.index_select(0, blocks), kv.bits, dtype)
    check_tails(kv, tails, b, "attention")
    return with_tails(x.view(b, -1, *x.shape[1:]), kv.k_tail, lens, tails)


def _gather(data: torch.Tensor, params: torch.Tensor | None, blocks: torch.Tensor, bits: int,
            dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks (N, Hkv, bs, D) of the cache as values in ``dtype``, a fresh tensor (safe to edit)."""
    x = data.index_select(0, blocks)
    if params is None:
        return x if x.dtype == dtype else x.to(dtype)
    return dequantize(x, params.index_select(0, blocks), bits, dtype)
