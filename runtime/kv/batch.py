"""What one step asks of the cache: which sequences, how many new tokens, which blocks.

``StepBatch`` is what rank 0 broadcasts (plain Python, cheap to pickle); ``PagedBatch`` is the same
on the device, as the kernels read it; ``LayerKV`` is one layer's paged storage.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


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
    split: tuple[torch.Tensor, "PagedBatch", torch.Tensor, "PagedBatch"] | None = None

    @classmethod
    def build(cls, batch: StepBatch, block_size: int, device: torch.device) -> "PagedBatch":
        whole = cls._build(batch, block_size, device)
        decode = [i for i, s in enumerate(batch.seqs) if s.new == 1]
        if whole.decode_only or not decode:
            return whole
        prefill = [i for i, s in enumerate(batch.seqs) if s.new > 1]
        starts = whole.query_start.tolist()
        rows = (lambda idx: torch.tensor([r for i in idx for r in range(starts[i], starts[i + 1])], device=device))
        sub = (lambda idx: cls._build(StepBatch(tuple(batch.seqs[i] for i in idx)), block_size, device))
        return dataclasses.replace(whole, split=(rows(decode), sub(decode), rows(prefill), sub(prefill)))

    @classmethod
    def _build(cls, batch: StepBatch, block_size: int, device: torch.device) -> "PagedBatch":
        width = max(len(s.blocks) for s in batch.seqs)
        tables = torch.tensor([list(s.blocks) + [0] * (width - len(s.blocks)) for s in batch.seqs], dtype=torch.int32)
        news = torch.tensor([s.new for s in batch.seqs], dtype=torch.int32)
        slots = []
        for s in batch.seqs:
            pos = torch.arange(s.context - s.new, s.context)
            slots.append(torch.tensor(s.blocks, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size)
        return cls(tables.to(device), torch.tensor([s.context for s in batch.seqs], dtype=torch.int32).to(device),
                   torch.cat([torch.zeros(1, dtype=torch.int32), news.cumsum(0, dtype=torch.int32)]).to(device),
                   torch.cat(slots).to(device), int(news.max()), max(s.context for s in batch.seqs), batch.decode_only)


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache. k, v: (num_blocks, kv_heads, block_size, packed_dim); params (…, 2) fp16 or None."""

    k: torch.Tensor
    v: torch.Tensor
    k_params: torch.Tensor | None
    v_params: torch.Tensor | None
    bits: int  # 4 or 8: codes + params; 16 or 32: plain floats

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)
