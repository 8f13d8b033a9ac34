"""Steps sent to the other ranks as compact messages (``runtime.worker.wire``): every rank rebuilds rank 0's
Step exactly, through growth, preemption, prefix sharing and skipped steps, while a decode step that
takes no new block sends no block at all; and ``Comm.broadcast_ints`` carries short and long messages."""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from runtime.engine.sampling import SamplingParams
from runtime.kv.batch import SeqSlice, StepBatch
from runtime.model.comm import Comm
from runtime.worker.parallel import Rendezvous, Topology, free_port, init_process_group, open_store
from runtime.worker.runner import Step
from runtime.worker.wire import StepDecoder, StepEncoder
from tests.runtime import test_scheduler as sched


def replay(steps: list[Step]) -> list[int]:
    """Encode and decode every step (then STOP) on a fresh pair; the sizes of the messages."""
    enc, dec, sizes = StepEncoder(), StepDecoder(), []
    for step in [*steps, None]:
        message = enc.encode(step)
        sizes.append(message.numel())
        assert dec.decode(message.clone()) == step
    return sizes


def step(*seqs: SeqSlice, all_logits: bool = False) -> Step:
    return Step([7] * sum(s.new for s in seqs), StepBatch(seqs), all_logits)


def test_only_new_blocks_travel():
    a, b = (1, 2), (3,)
    steps = [
        step(SeqSlice(1, 70, 70, a, 4), SeqSlice(2, 3, 3, b, 0)),  # first steps: whole tables (and int4 tail slots)
        step(SeqSlice(1, 1, 71, a), SeqSlice(2, 1, 4, b)),  # nothing new
        step(SeqSlice(1, 1, 72, a), SeqSlice(2, 1, 65, b + (4, 5))),  # two blocks appended to seq 2
        step(SeqSlice(2, 1, 66, b + (4, 5))),  # seq 1 skipped: forgotten
        step(SeqSlice(1, 1, 73, a), SeqSlice(2, 1, 3, (9,))),  # seq 1 again (whole); seq 2 re-admitted elsewhere
        step(SeqSlice(5, 9, 9, (6,)), all_logits=True),  # prompt logits
        step(SeqSlice(5, 9, 18, (6, 8)), all_logits=True),  # its next chunk
    ]
    sizes = replay(steps)
    header, per_seq = 6, 6
    assert sizes[1] == header + 2 * per_seq + 2  # two tokens, no block
    assert sizes[2] == header + 2 * per_seq + 2 + 2
    assert sizes[4] == header + 2 * per_seq + 2 + len(a) + 1
    assert sizes[-1] == header  # STOP


def test_unchanged_tables_are_recognised_by_value_too():
    # a table rebuilt as an equal tuple (not the same object) still sends nothing
    first = step(SeqSlice(1, 1, 17, (4, 5)))
    again = step(SeqSlice(1, 1, 18, tuple(range(4, 6))))
    assert replay([first, again])[1] == 6 + 6 + 1


def test_engine_runs_replay_exactly():
    """The scheduler's own steps: chunked prefill beside decodes, preemption in a tiny cache, prefix sharing."""
    params = SamplingParams(temperature=0, max_tokens=30)
    for kw in ({"batch_tokens": 32}, {"num_blocks": 7, "batch_tokens": 64}, {"prefix": True}):
        eng, driver = sched.engine(**kw)
        sched.generate(eng, sched.PROMPTS, [params] * len(sched.PROMPTS))
        sched.generate(eng, sched.PROMPTS[:2], [params] * 2)  # again: prefix hits, reused blocks
        sizes = replay(driver.steps)
        decodes = [i for i, s in enumerate(driver.steps) if s.batch.decode_only]
        blocks = [sizes[i] - 6 - 7 * len(driver.steps[i].batch.seqs) for i in decodes]  # blocks sent
        assert sum(blocks) < sum(len(s.blocks) for i in decodes for s in driver.steps[i].batch.seqs) / 4


def _broadcast_rank(rank: int, world: int, port: int, messages: list[torch.Tensor]) -> None:
    timeout = timedelta(seconds=60)
    store = open_store(Rendezvous("127.0.0.1", port, rank == 0), world, timeout)
    comm = init_process_group(Topology(rank, world, 1, rank), store, torch.device("cpu"), timeout)
    try:
        for m in messages:
            got = comm.broadcast_ints(m if rank == 0 else None)
            assert got.dtype == torch.int64 and torch.equal(got, m), (rank, m.numel())
    finally:
        dist.destroy_process_group()


def test_broadcast_ints_short_and_long_messages():
    messages = [torch.arange(n, dtype=torch.int64) * 3 - 5 for n in (1, 17, 1023, 1024, 1025, 5000)]
    tmp.spawn(_broadcast_rank, args=(2, free_port(), messages), nprocs=2)


def test_one_rank_broadcast_is_the_message_itself():
    m = torch.arange(5)
    assert Comm(0, 1).broadcast_ints(m) is m
