"""What one step asks of the cache: which sequences, how many new tokens, which blocks.

``StepBatch`` is what rank 0 broadcasts (plain Python, cheap to pickle); ``paged_batch`` turns it into
the kernels' ``PagedBatch`` on the device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from runtime.kernels.paged import PagedBatch


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a packed step: ``new`` tokens, after which it holds ``context`` tokens
    in the cache blocks ``blocks`` (in order; enough of them for ``context`` tokens)."""

    seq_id: int
    new: int
    context: int
    blocks: tuple[int, ...] = ()


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
        return torch.cat([torch.arange(s.context - s.new, s.context) for s in self.seqs])

    def last_token_index(self) -> torch.Tensor:
        """Row of each sequence's last new token in the packed step (where logits are needed)."""
        ends = torch.tensor([s.new for s in self.seqs]).cumsum(0)
        return ends - 1


def paged_batch(batch: StepBatch, block_size: int, device: torch.device) -> PagedBatch:
    """The kernels' device view of a step."""
    whole = _build(batch, block_size, device)
    decode = [i for i, s in enumerate(batch.seqs) if s.new == 1]
    if whole.decode_only or not decode:
        return whole
    prefill = [i for i, s in enumerate(batch.seqs) if s.new > 1]
    starts = whole.query_start.tolist()
    rows = (lambda idx: torch.tensor([r for i in idx for r in range(starts[i], starts[i + 1])], device=device))
    sub = (lambda idx: _build(StepBatch(tuple(batch.seqs[i] for i in idx)), block_size, device))
    return dataclasses.replace(whole, split=(rows(decode), sub(decode), rows(prefill), sub(prefill)))


def _build(batch: StepBatch, block_size: int, device: torch.device) -> PagedBatch:
    width = max(len(s.blocks) for s in batch.seqs)
    tables = torch.tensor([list(s.blocks) + [0] * (width - len(s.blocks)) for s in batch.seqs], dtype=torch.int32)
    news = torch.tensor([s.new for s in batch.seqs], dtype=torch.int32)
    slots = []
    for s in batch.seqs:
        pos = torch.arange(s.context - s.new, s.context)
        slots.append(torch.tensor(s.blocks, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size)
    return PagedBatch(tables.to(device), torch.tensor([s.context for s in batch.seqs], dtype=torch.int32).to(device),
               torch.cat([torch.zeros(1, dtype=torch.int32), news.cumsum(0, dtype=torch.int32)]).to(device),
               torch.cat(slots).to(device), int(news.max()), max(s.context for s in batch.seqs), batch.decode_only)
