"""``paged_batch`` (a fixed number of tensor operations) gives exactly what the per-sequence loops it
replaced gave, kept here as the oracle, on random batches of awkward sizes, prefill and decode mixed."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from runtime.kernels.paged import PagedBatch
from runtime.kv.batch import SeqSlice, StepBatch, paged_batch


def loop_paged_batch(batch: StepBatch, block_size: int) -> PagedBatch:
    """The v0.1 implementation: a Python loop per sequence for the slots, per token for the split rows."""
    whole = _loop_build(batch, block_size)
    decode = [i for i, s in enumerate(batch.seqs) if s.new == 1]
    if whole.decode_only or not decode:
        return whole
    prefill = [i for i, s in enumerate(batch.seqs) if s.new > 1]
    starts = whole.query_start.tolist()
    rows = (lambda idx: torch.tensor([r for i in idx for r in range(starts[i], starts[i + 1])]))
    sub = (lambda idx: _loop_build(StepBatch(tuple(batch.seqs[i] for i in idx)), block_size))
    return dataclasses.replace(whole, split=(rows(decode), sub(decode), rows(prefill), sub(prefill)))


def _loop_build(batch: StepBatch, block_size: int) -> PagedBatch:
    width = max(len(s.blocks) for s in batch.seqs)
    tables = torch.tensor([list(s.blocks) + [0] * (width - len(s.blocks)) for s in batch.seqs], dtype=torch.int32)
    news = torch.tensor([s.new for s in batch.seqs], dtype=torch.int32)
    slots = []
    for s in batch.seqs:
        pos = torch.arange(s.context - s.new, s.context)
        slots.append(torch.tensor(s.blocks, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size)
    return PagedBatch(tables, torch.tensor([s.context for s in batch.seqs], dtype=torch.int32),
                      torch.cat([torch.zeros(1, dtype=torch.int32), news.cumsum(0, dtype=torch.int32)]),
                      torch.cat(slots), int(news.max()), max(s.context for s in batch.seqs), batch.decode_only)


def random_batch(rng: random.Random, size: int, block_size: int, decode_share: float) -> StepBatch:
    """``size`` sequences with shuffled blocks (some with a spare one), decoding or taking a prompt chunk."""
    pool = list(range(10_000))
    rng.shuffle(pool)
    seqs = []
    for i in range(size):
        context = rng.choice([1, 3, 17, 65, 1025, rng.randint(1, 300)])
        new = 1 if rng.random() < decode_share else rng.randint(1, context)
        blocks = -(-context // block_size) + rng.choice([0, 0, 1])  # a table may run ahead of its context
        seqs.append(SeqSlice(rng.randint(0, 10 ** 6), new, context, tuple(pool[:blocks])))
        del pool[:blocks]
    return StepBatch(tuple(seqs))


def assert_same(got: PagedBatch, want: PagedBatch) -> None:
    for f in dataclasses.fields(PagedBatch):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name == "split":
            assert (a is None) == (b is None)
            if a is not None:
                for x, y in zip(a, b):
                    (assert_same if isinstance(x, PagedBatch) else _same_tensor)(x, y)
        elif isinstance(a, torch.Tensor):
            _same_tensor(a, b)
        else:
            assert a == b and type(a) is type(b), f.name


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("decode_share", [0.0, 0.5, 1.0], ids=["prefill", "mixed", "decode"])
@pytest.mark.parametrize("size", [1, 3, 17, 65], ids=lambda n: f"B{n}")
@pytest.mark.parametrize("block_size", [16, 64], ids=lambda b: f"bs{b}")
def test_paged_batch_equals_the_per_sequence_loops(size, block_size, decode_share):
    rng = random.Random(size * 1000 + block_size + int(10 * decode_share))
    for _ in range(5):
        batch = random_batch(rng, size, block_size, decode_share)
        assert_same(paged_batch(batch, block_size, torch.device("cpu")), loop_paged_batch(batch, block_size))
        want = torch.cat([torch.arange(s.context - s.new, s.context) for s in batch.seqs])
        assert torch.equal(batch.positions(), want)


def test_mixed_step_splits_rows_by_kind():
    batch = StepBatch((SeqSlice(1, 1, 17, (4, 5)), SeqSlice(2, 3, 3, (9,)), SeqSlice(3, 1, 65, (1, 2, 3, 7, 8))))
    pb = paged_batch(batch, 16, torch.device("cpu"))
    dec_rows, dec, pre_rows, pre = pb.split
    assert dec_rows.tolist() == [0, 4] and pre_rows.tolist() == [1, 2, 3]
    assert dec.decode_only and dec.block_tables.shape == (2, 5) and pre.block_tables.tolist() == [[9]]
    assert pb.slots.tolist() == [5 * 16 + 0, 9 * 16 + 0, 9 * 16 + 1, 9 * 16 + 2, 8 * 16 + 0]


def test_a_table_too_short_for_its_context_is_an_internal_error():
    with pytest.raises(AssertionError, match="too few blocks"):
        paged_batch(StepBatch((SeqSlice(1, 1, 17, (4,)),)), 16, torch.device("cpu"))


def loop_key_writes(batch: StepBatch, block_size: int) -> tuple[list, list, list, list]:
    """Per sequence and position: which blocks the step fills (and where each of their keys is now), which
    new keys stay in a partial block (and at which tail row)."""
    bs, tail_rows, tail_dst, full, src = block_size, [], [], [], []
    row = 0
    for s in batch.seqs:
        first = s.context - s.new
        for pos in range(first, s.context):
            if pos // bs == s.context // bs:  # the block still partial after this step
                tail_rows.append(row + pos - first)
                tail_dst.append(s.tail * bs + pos % bs)
            elif pos % bs == bs - 1:  # fills its block
                full.append(s.blocks[pos // bs])
                src.append([row + p - first if p >= first else -1 - (s.tail * bs + p % bs)
                            for p in range(pos - bs + 1, pos + 1)])
        row += s.new
    return tail_rows, tail_dst, full, src


@pytest.mark.parametrize("decode_share", [0.0, 0.5, 1.0], ids=["prefill", "mixed", "decode"])
@pytest.mark.parametrize("block_size", [16, 64], ids=lambda b: f"bs{b}")
def test_int4_key_writes_equal_the_per_position_loop(block_size, decode_share):
    rng = random.Random(block_size + int(10 * decode_share))
    for size in (1, 3, 17):
        batch = random_batch(rng, size, block_size, decode_share)
        batch = StepBatch(tuple(dataclasses.replace(s, tail=size - 1 - i) for i, s in enumerate(batch.seqs)))
        pb = paged_batch(batch, block_size, torch.device("cpu"), channel_keys=True)
        tail_rows, tail_dst, full, src = loop_key_writes(batch, block_size)
        keys = pb.keys
        assert keys.tail_rows.tolist() == tail_rows and keys.tail_dst.tolist() == tail_dst
        assert keys.full_blocks.tolist() == full and keys.full_src.view(-1, block_size).tolist() == src
        assert pb.tails.tolist() == [s.tail for s in batch.seqs] and pb.tails.dtype == torch.int32
        if pb.split is not None:  # each half attends with its own sequences' tails
            _, dec, _, pre = pb.split
            assert sorted(dec.tails.tolist() + pre.tails.tolist()) == sorted(pb.tails.tolist())


def test_an_int4_step_without_tail_slots_is_an_internal_error():
    with pytest.raises(RuntimeError, match="without a tail slot"):
        paged_batch(StepBatch((SeqSlice(1, 1, 17, (4, 5)),)), 16, torch.device("cpu"), channel_keys=True)
