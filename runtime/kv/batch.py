"""What one step asks of the cache: which sequences, how many new tokens, which blocks.

``StepBatch`` is what rank 0 sends the other ranks (plain Python); ``paged_batch`` turns it into the
kernels' ``PagedBatch`` on the device with a fixed number of tensor operations, whatever the batch size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import chain

import torch

from runtime.kernels.paged import KeyWrites, PagedBatch


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a packed step: ``new`` tokens, after which it holds ``context`` tokens
    in the cache blocks ``blocks`` (in order; enough of them for ``context`` tokens)."""

    seq_id: int
    new: int
    context: int
    blocks: tuple[int, ...] = ()
    tail: int = -1  # its slot for the partial last block of int4 keys (``BlockManager.tail``); -1: none


@dataclass(frozen=True)
class StepBatch:
    seqs: tuple[SeqSlice, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.new for s in self.seqs)

    @property
    def decode_only(self) -> bool:
        return all(s.new == 1 for s in self.seqs)

    def positions(self) -> torch.Tensor:
        """(T,) int64: the position of every new token in its sequence."""
        news = torch.tensor([s.new for s in self.seqs])
        first = torch.tensor([s.context for s in self.seqs]) - news  # (B,) position of each first new token
        starts = news.cumsum(0) - news  # (B,) row of each first new token
        return torch.arange(int(news.sum())) + torch.repeat_interleave(first - starts, news)

    def last_token_index(self) -> torch.Tensor:
        """Row of each sequence's last new token in the packed step (where logits are needed)."""
        ends = torch.tensor([s.new for s in self.seqs]).cumsum(0)
        return ends - 1


def paged_batch(batch: StepBatch, block_size: int, device: torch.device, channel_keys: bool = False) -> PagedBatch:
    """The kernels' device view of a step (a step mixing prompt chunks and decodes is also split in two);
    ``channel_keys``: the cache keeps int4 keys' partial blocks in tail slots (``KeyWrites``)."""
    seqs = batch.seqs
    news = torch.tensor([s.new for s in seqs])  # (B,) int64
    contexts = torch.tensor([s.context for s in seqs])  # (B,)
    counts = torch.tensor([len(s.blocks) for s in seqs])  # (B,)
    assert bool((contexts <= counts * block_size).all()), "a sequence has too few blocks for its context"
    width = int(counts.max())
    tables = torch.zeros(len(seqs), width, dtype=torch.int64)  # (B, W): padded with block 0
    held = torch.arange(width)[None, :] < counts[:, None]  # (B, W): row-major, the order of the blocks below
    tables[held] = torch.tensor(list(chain.from_iterable(s.blocks for s in seqs)), dtype=torch.int64)
    seq = torch.repeat_interleave(torch.arange(len(seqs)), news)  # (T,) sequence of each new token
    starts = news.cumsum(0) - news  # (B,) row of each sequence's first new token
    pos = torch.arange(seq.shape[0]) + (contexts - news - starts)[seq]  # (T,) position in its sequence
    slots = tables[seq, pos // block_size] * block_size + pos % block_size  # (T,) int64
    tails = torch.tensor([s.tail for s in seqs]) if channel_keys else None  # (B,)
    if tails is not None and bool((tails < 0).any()):
        raise RuntimeError("internal: an int4 cache step has a sequence without a tail slot")
    whole = _view(tables, counts, news, contexts, slots, device, tails)
    if tails is not None:
        whole = dataclasses.replace(whole, keys=_key_writes(pos, seq, slots, contexts - news, contexts, tails,
                                                            block_size, device))
    decode = news == 1
    if whole.decode_only or not bool(decode.any()):
        return whole
    dec, pre = decode.nonzero().squeeze(1), (~decode).nonzero().squeeze(1)
    dec_rows, pre_rows = starts[dec], (~decode)[seq].nonzero().squeeze(1)  # rows of the packed step

    def sub(idx: torch.Tensor, rows: torch.Tensor) -> PagedBatch:
        return _view(tables[idx], counts[idx], news[idx], contexts[idx], slots[rows], device,
                     None if tails is None else tails[idx])

    split = (dec_rows.to(device), sub(dec, dec_rows), pre_rows.to(device), sub(pre, pre_rows))
    return dataclasses.replace(whole, split=split)


def _key_writes(pos: torch.Tensor, seq: torch.Tensor, slots: torch.Tensor, firsts: torch.Tensor,
                contexts: torch.Tensor, tails: torch.Tensor, bs: int, device: torch.device) -> KeyWrites:
    """Which blocks the step fills (each has exactly one new token at its last offset) and where their
    keys are; which new keys stay in a partial block (the one holding position ``context - 1``)."""
    ends = (pos % bs == bs - 1).nonzero().squeeze(1)  # (C,) rows of the tokens that fill a block
    last = pos[ends][:, None]  # (C, 1)
    kpos = last - (bs - 1) + torch.arange(bs)  # (C, bs) positions of each filled block's keys
    in_tail = tails[seq[ends]][:, None] * bs + kpos % bs  # where an earlier step's key is
    src = torch.where(kpos >= firsts[seq[ends]][:, None], ends[:, None] - (last - kpos), -1 - in_tail)
    rows = (pos // bs == contexts[seq] // bs).nonzero().squeeze(1)  # (Tt,) new keys of partial blocks
    return KeyWrites(rows.to(device), (tails[seq[rows]] * bs + pos[rows] % bs).to(device),
                     (slots[ends] // bs).to(device), src.to(device))


def _view(tables: torch.Tensor, counts: torch.Tensor, news: torch.Tensor, contexts: torch.Tensor, slots: torch.Tensor,
          device: torch.device, tails: torch.Tensor | None = None) -> PagedBatch:
    """A PagedBatch of these sequences; the table is as wide as their longest one."""
    query_start = torch.cat([torch.zeros(1, dtype=torch.int64), news.cumsum(0)])  # (B + 1,)
    return PagedBatch(tables[:, :int(counts.max())].to(device, torch.int32), contexts.to(device, torch.int32),
                      query_start.to(device, torch.int32), slots.to(device), int(news.max()), int(contexts.max()),
                      bool((news == 1).all()), tails=None if tails is None else tails.to(device, torch.int32))
