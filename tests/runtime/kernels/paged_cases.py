"""Random paged caches for kernel tests: scattered, shuffled blocks, any precision, any lengths."""
from __future__ import annotations

from dataclasses import replace

import torch

from runtime.kernels import reference
from runtime.kernels.paged import TAIL_DTYPE, LayerKV, PagedBatch
from runtime.kv.batch import SeqSlice, StepBatch, paged_batch
from runtime.kv.format import kv_format

KV_NAMES = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}


def empty_cache(bits: int, num_blocks: int, kv_heads: int, block_size: int, head_dim: int, device,
                dtype: torch.dtype = torch.float32, tail_slots: int = 8) -> LayerKV:
    """An empty layer cache; float caches (bits 16/32) are stored in ``dtype``, which must have that width;
    int4 with ``tail_slots`` partial blocks of keys."""
    if bits not in (4, 8) and dtype.itemsize * 8 != bits:
        raise ValueError(f"bits={bits} but dtype {dtype} has {dtype.itemsize * 8} bits")
    fmt = kv_format(KV_NAMES[bits] if bits in (4, 8) else {torch.float16: "fp16", torch.float32: "fp32",
                                                              torch.bfloat16: "bf16"}[dtype], dtype, head_dim)
    shape = (num_blocks, kv_heads, block_size, fmt.packed_dim(head_dim))
    k, v = torch.zeros(shape, dtype=fmt.dtype, device=device), torch.zeros(shape, dtype=fmt.dtype, device=device)
    if not fmt.quantized:
        return LayerKV(k, v, None, None, fmt.bits)
    pshape = shape[:3] + (2,)
    kshape = shape[:2] + (head_dim, 2) if fmt.channel_keys else pshape
    tail = torch.zeros((tail_slots, kv_heads, block_size, head_dim), dtype=TAIL_DTYPE, device=device)
    return LayerKV(k, v, torch.zeros(kshape, dtype=torch.float16, device=device),
                   torch.zeros(pshape, dtype=torch.float16, device=device), fmt.bits,
                   tail if fmt.channel_keys else None)


def step(contexts: list[int], news: list[int], block_size: int, seed: int = 0) -> tuple[StepBatch, int]:
    """A StepBatch whose sequences own disjoint, shuffled blocks (so block order matters) and tail slots
    (in reverse order, so a slot mix-up shows); and the block count."""
    need = [-(-c // block_size) for c in contexts]
    perm = torch.randperm(sum(need) + 3, generator=torch.Generator().manual_seed(seed)).tolist()
    seqs, at = [], 0
    for i, (c, n, k) in enumerate(zip(contexts, news, need)):
        seqs.append(SeqSlice(i + 1, n, c, tuple(perm[at:at + k]), len(contexts) - 1 - i))
        at += k
    return StepBatch(tuple(seqs)), sum(need) + 3


def filled(bits: int, contexts: list[int], news: list[int], kv_heads: int, head_dim: int, block_size: int, device,
           dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0):
    """A cache holding every sequence's first ``context - new`` tokens (written by the reference),
    plus this step's batch: returns (kv, paged_batch, k_new, v_new) with k/v_new (T, Hkv, D)."""
    batch, num_blocks = step(contexts, news, block_size, seed)
    kv = empty_cache(bits, num_blocks, kv_heads, block_size, head_dim, device, dtype, max(8, len(contexts)))
    g = torch.Generator().manual_seed(seed + 1)
    past = StepBatch(tuple(SeqSlice(s.seq_id, s.context - s.new, s.context - s.new, s.blocks, s.tail)
                           for s in batch.seqs if s.context > s.new))
    if past.seqs:
        pb_past = paged_batch(past, block_size, device, kv.channel_keys)
        t = past.num_tokens
        reference.write_kv(kv, _rand((t, kv_heads, head_dim), g, scale, dtype, device),
                           _rand((t, kv_heads, head_dim), g, scale, dtype, device), pb_past.slots, pb_past.keys)
    t = batch.num_tokens
    k_new, v_new = (_rand((t, kv_heads, head_dim), g, scale, dtype, device) for _ in range(2))
    return kv, paged_batch(batch, block_size, device, kv.channel_keys), k_new, v_new


def _rand(shape, g, scale, dtype, device) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def clone(kv: LayerKV) -> LayerKV:
    c = (lambda t: None if t is None else t.clone())
    return LayerKV(kv.k.clone(), kv.v.clone(), c(kv.k_params), c(kv.v_params), kv.bits, c(kv.k_tail))


def garbage(kv: LayerKV, pb: PagedBatch, seed: int = 0) -> tuple[LayerKV, PagedBatch]:
    """The same cache with random bits (NaN, inf, 1e38 and everything between) in every slot no sequence
    holds, behind a new garbage block 0: real table entries move up by one, padding stays 0. What a
    ``torch.empty`` cache may hold where nothing was written; a path that reads it shows NaN or a wrong value."""
    bs, nb, dev = kv.block_size, kv.k.shape[0], kv.k.device
    held = torch.zeros(nb * bs, dtype=torch.bool)
    for table, n in zip(pb.block_tables.tolist(), pb.seq_lens.tolist()):
        pos = torch.arange(n)
        held[torch.tensor(table)[pos // bs] * bs + pos % bs] = True
    free = ~held.view(nb, 1, bs, 1).to(dev)  # broadcasts over (num_blocks, Hkv, block_size, X)
    g = torch.Generator().manual_seed(seed)

    def spoil(t):  # (nb, ...) -> (nb + 1, ...): random bits where free, and in the new block 0
        bits = _random_bits(t.shape, t.dtype, g).to(dev)
        t = torch.where(free, bits, t)
        return torch.cat([_random_bits(t[:1].shape, t.dtype, g).to(dev), t])
    p = (lambda t: None if t is None else spoil(t))
    if kv.channel_keys:  # a block's channel params are written once it is full: spoil those of every other block
        full = held.view(nb, bs).all(1).view(nb, 1, 1, 1).to(dev)
        bits = _random_bits((nb + 1,) + kv.k_params.shape[1:], kv.k_params.dtype, g).to(dev)
        k_params = torch.cat([bits[:1], torch.where(full, kv.k_params, bits[1:])])
    else:
        k_params = p(kv.k_params)
    kv = LayerKV(spoil(kv.k), spoil(kv.v), k_params, p(kv.v_params), kv.bits,
                 None if kv.k_tail is None else _spoil_tails(kv.k_tail, pb, g))
    width = pb.block_tables.shape[1]
    real = torch.arange(width, device=dev)[None, :] < ((pb.seq_lens + bs - 1) // bs)[:, None]  # (B, width)
    keys = pb.keys and replace(pb.keys, full_blocks=pb.keys.full_blocks + 1)
    return kv, replace(pb, block_tables=torch.where(real, pb.block_tables + 1, 0).int(), slots=pb.slots + bs,
                       keys=keys)


def _spoil_tails(tail: torch.Tensor, pb: PagedBatch, g: torch.Generator) -> torch.Tensor:
    """Random bits in every tail row no sequence's partial block holds (unused slots included)."""
    slots, _, bs, _ = tail.shape
    held = torch.zeros(slots, 1, bs, 1, dtype=torch.bool)
    for slot, n in zip(pb.tails.tolist(), pb.seq_lens.tolist()):
        held[slot, 0, :n % bs] = True
    return torch.where(held.to(tail.device), tail, _random_bits(tail.shape, tail.dtype, g).to(tail.device))


def _random_bits(shape, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Uniformly random bit patterns of ``dtype``."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[dtype.itemsize]
    info = torch.iinfo(as_int)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(as_int).view(dtype)
