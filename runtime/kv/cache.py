"""One rank's paged KV cache: the storage tensors and the single ``attend`` call site of the model.

Storage per K and V: ``(layers, num_blocks, kv_heads, block_size, packed_dim)`` plus, for int8/int4,
fp16 ``[scale, zero]`` of shape ``(layers, num_blocks, kv_heads, block_size, 2)``; int4 keys instead have
``(layers, num_blocks, kv_heads, head_dim, 2)`` (per channel of a full block) and fp16 tails
``(layers, tail_slots, kv_heads, block_size, head_dim)`` for the partial blocks (``format.py``).
``attend`` writes the step's keys and values into their slots, then attends over the paged cache:
a decode-only step takes the decode kernel, anything with a prompt chunk the prefill kernel.
"""
from __future__ import annotations

import torch

from runtime.kernels import Kernels
from runtime.kernels.paged import PARAM_DTYPE, TAIL_DTYPE, LayerKV, PagedBatch
from runtime.kv.batch import StepBatch, paged_batch
from runtime.kv.format import KVShape, key_rotation


class PagedKVCache:
    def __init__(self, shape: KVShape, num_blocks: int, device: torch.device, kernels: Kernels,
                 sliding_window: int | None | list[int | None] = None, compute_dtype: torch.dtype = torch.float32,
                 scale: float | None = None, tail_slots: int = 0):
        """``sliding_window``: one window for every layer, or one per layer (None: full attention);
        ``scale``: the softmax scale (default head_dim ** -0.5); ``tail_slots``: sequences that may hold
        blocks at once (int4 keys keep each one's partial block in fp16 until it fills)."""
        self.shape, self.num_blocks, self.kernels = shape, num_blocks, kernels
        self.windows = sliding_window if isinstance(sliding_window, list) else [sliding_window] * shape.num_layers
        self.scale = shape.head_dim ** -0.5 if scale is None else scale
        fmt = shape.fmt
        data = (shape.num_layers, num_blocks, shape.kv_heads, shape.block_size, fmt.packed_dim(shape.head_dim))
        # torch.empty: pages are committed only when written; never-written slots are masked out by length.
        self.k = torch.empty(data, dtype=fmt.dtype, device=device)
        self.v = torch.empty(data, dtype=fmt.dtype, device=device)
        params = data[:-1] + (2,)
        k_params = data[:3] + (shape.head_dim, 2) if fmt.channel_keys else params  # per channel of a block
        self.k_params = torch.empty(k_params, dtype=PARAM_DTYPE, device=device) if fmt.quantized else None
        self.v_params = torch.empty(params, dtype=PARAM_DTYPE, device=device) if fmt.quantized else None
        self.tail_slots = tail_slots if fmt.channel_keys else 0
        tail = (shape.num_layers, tail_slots, shape.kv_heads, shape.block_size, shape.head_dim)
        self.k_tail = torch.empty(tail, dtype=TAIL_DTYPE, device=device) if fmt.channel_keys else None
        self.rotation = key_rotation(shape.head_dim, compute_dtype, device) if fmt.quantized else None

    @property
    def nbytes(self) -> int:
        """The blocks' bytes (the tails are counted with the reserve: they do not grow with the cache)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_params, self.v_params) if t is not None)

    def layer(self, i: int) -> LayerKV:
        p = (lambda t: None if t is None else t[i])
        return LayerKV(self.k[i], self.v[i], p(self.k_params), p(self.v_params), self.shape.fmt.bits, p(self.k_tail))

    def prepare(self, batch: StepBatch) -> PagedBatch:
        """The step's block tables and slots on the device, built once and shared by every layer."""
        return paged_batch(batch, self.shape.block_size, self.k.device, self.k_tail is not None)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pb: PagedBatch) -> torch.Tensor:
        """Store k, v (T, Hkv, D) and attend: q (T, Hq, D) -> (T, Hq, D)."""
        r = self.rotation
        if r is not None:  # int8/int4 keys are stored rotated (format.py); scores are unchanged
            q, k = q @ r, k @ r
        if self.shape.fmt.rotate_values:  # so are int4 values: the output comes out rotated, R undoes it (R R = I)
            return self._attend(layer, q, k, v @ r, pb) @ r
        return self._attend(layer, q, k, v, pb)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pb: PagedBatch) -> torch.Tensor:
        kv, window = self.layer(layer), self.windows[layer]
        self.kernels.write_kv(kv, k, v, pb.slots, pb.keys)
        if pb.decode_only:
            return self.kernels.decode_attention(q, kv, pb.block_tables, pb.seq_lens, self.scale, window, pb.tails)
        if pb.split is None:
            return self.kernels.prefill_attention(q, kv, pb, self.scale, window)
        dec_rows, dec, pre_rows, pre = pb.split
        out = torch.empty_like(q)
        out[dec_rows] = self.kernels.decode_attention(q[dec_rows], kv, dec.block_tables, dec.seq_lens, self.scale,
                                                      window, dec.tails)
        out[pre_rows] = self.kernels.prefill_attention(q[pre_rows], kv, pre, self.scale, window)
        return out
