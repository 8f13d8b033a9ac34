"""The KV cache behind one attention call site.

``SequenceKVCache`` keeps one contiguous K and V buffer per sequence, sized at admission to the
sequence's prompt plus its token budget. The paged, quantized cache replaces it behind the same
``attend`` method, so the model's attention call stays one line.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a packed step: ``new`` tokens, after which it holds ``context`` tokens."""

    seq_id: int
    new: int
    context: int


@dataclass(frozen=True)
class StepBatch:
    seqs: tuple[SeqSlice, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.new for s in self.seqs)

    def positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(s.context - s.new, s.context) for s in self.seqs])

    def last_token_index(self) -> torch.Tensor:
        """Row of each sequence's last new token in the packed step (where logits are needed)."""
        ends = torch.tensor([s.new for s in self.seqs]).cumsum(0)
        return ends - 1


class SequenceKVCache:
    """Per-sequence contiguous K/V: (layers, kv_heads, capacity, head_dim) each."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 sliding_window: int | None = None):
        self.shape = (num_layers, kv_heads, head_dim)
        self.dtype, self.device, self.window = dtype, device, sliding_window
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def allocate(self, seq_id: int, capacity: int) -> None:
        layers, kvh, d = self.shape
        self.k[seq_id] = torch.empty(layers, kvh, capacity, d, dtype=self.dtype, device=self.device)
        self.v[seq_id] = torch.empty_like(self.k[seq_id])

    def free(self, seq_id: int) -> None:
        self.k.pop(seq_id, None)
        self.v.pop(seq_id, None)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Store this step's k/v, then attend causally over each sequence's cache. q: (T, Hq, D); k, v: (T, Hkv, D)."""
        out, row = torch.empty_like(q), 0
        for s in batch.seqs:
            start = s.context - s.new
            kc, vc = self.k[s.seq_id][layer], self.v[s.seq_id][layer]  # (Hkv, cap, D)
            kc[:, start:s.context] = k[row:row + s.new].transpose(0, 1)
            vc[:, start:s.context] = v[row:row + s.new].transpose(0, 1)
            qs = q[row:row + s.new].transpose(0, 1)  # (Hq, new, D)
            mask = self._mask(s, q.device)
            o = F.scaled_dot_product_attention(qs, kc[:, :s.context], vc[:, :s.context], attn_mask=mask,
                                               is_causal=mask is None and s.new > 1, enable_gqa=True)
            out[row:row + s.new] = o.transpose(0, 1)
            row += s.new
        return out

    def _mask(self, s: SeqSlice, device: torch.device) -> torch.Tensor | None:
        """None when plain causal (or a single query) suffices; else a (new, context) boolean mask."""
        window_matters = self.window is not None and s.context > self.window
        if not window_matters and (s.new == s.context or s.new == 1):
            return None
        qpos = torch.arange(s.context - s.new, s.context, device=device)[:, None]
        kpos = torch.arange(s.context, device=device)[None, :]
        allowed = kpos <= qpos
        if window_matters:
            allowed &= kpos > qpos - self.window
        return allowed
