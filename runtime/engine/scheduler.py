"""Continuous batching: which sequences run in the next step, and with how many tokens each.

Every step, in this order, within ``max_batch_tokens`` new tokens and ``max_batch_size`` sequences:

1. running sequences, oldest first: one token each when decoding, the next chunk of their prompt when
   still prefilling (long prompts are prefilled in chunks, mixed with everyone else's decodes);
2. waiting sequences, first come first served, starting after any prefix already in the cache.

Blocks are taken as sequences grow. When a running sequence needs a block and none is free, the
youngest running sequence is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed from its prompt and the tokens it already produced (nothing is lost: its
sampled tokens and random stream are kept).

With pipeline stages, up to ``depth`` steps are in flight at once: ``schedule(busy)`` leaves out the
sequences of the steps still in flight (their next token is not known yet) and never preempts them,
and up to ``depth × max_batch_size`` sequences run, ``max_batch_size`` per step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from runtime.kv.batch import SeqSlice
from runtime.kv.blocks import BlockManager


@dataclass(frozen=True)
class Work:
    """One sequence's share of a step: ``new`` tokens starting at ``start``; ``sample`` when they end
    its known tokens (its logits give the next token)."""

    seq: object  # runtime.engine.Sequence
    start: int
    new: int

    @property
    def sample(self) -> bool:
        return self.start + self.new == len(self.seq.tokens)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_batch_tokens: int, depth: int = 1):
        self.blocks, self.max_batch_size, self.max_batch_tokens = blocks, max_batch_size, max_batch_tokens
        self.depth = depth
        self.waiting: deque = deque()
        self.running: list = []
        self.preemptions = 0
        self.prefix_queried = self.prefix_hit = 0  # prompt tokens looked up / found in the prefix cache

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq) -> None:
        self.waiting.append(seq)

    def remove(self, seq) -> None:
        """Drop a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)

    def schedule(self, busy: frozenset | set = frozenset()) -> list[Work]:
        """The next step's work; ``busy``: sequences of steps still in flight, left alone."""
        work: list[Work] = []
        budget = self.max_batch_tokens
        # Steps in flight share the sequences evenly (each stage then has equal work to do)
        size = min(self.max_batch_size, -(-(len(self.running) + len(self.waiting)) // self.depth))
        for seq in sorted(self.running, key=lambda s: s.seq_id):
            if seq not in self.running or seq in busy or budget == 0 or len(work) == size:
                continue  # preempted while making room for an older sequence, or in flight
            new = min(len(seq.tokens) - seq.computed, budget)
            if self._make_room(seq, seq.computed + new, busy):
                work.append(Work(seq, seq.computed, new))
                budget -= new
        limit = self.max_batch_size * self.depth
        while self.waiting and budget and len(work) < size and len(self.running) < limit:
            item = self._admit(self.waiting[0], budget)
            if item is None:
                break
            self.running.append(self.waiting.popleft())
            work.append(item)
            budget -= item.new
        return work

    def finished_step(self, work: list[Work]) -> None:
        """The step ran: its tokens are in the cache (and full blocks join the prefix cache)."""
        for w in work:
            w.seq.computed = w.start + w.new
            self.blocks.register_full_blocks(w.seq.seq_id, w.seq.tokens, w.seq.computed)

    def slice(self, w: Work) -> SeqSlice:
        sid = w.seq.seq_id
        return SeqSlice(sid, w.new, w.start + w.new, self.blocks.table(sid), self.blocks.tail(sid))

    def _admit(self, seq, budget: int) -> Work | None:
        if seq.computed == 0 and seq.seq_id not in self.blocks.tables:
            seq.computed = self.blocks.match_prefix(seq.seq_id, seq.tokens)
            if seq.cached < 0:
                seq.cached = seq.computed
            if self.blocks.prefix_caching:
                self.prefix_queried += len(seq.tokens)
                self.prefix_hit += seq.computed
        new = min(len(seq.tokens) - seq.computed, budget)
        if not self.blocks.can_grow(seq.seq_id, seq.computed + new):
            self.blocks.free(seq.seq_id)  # give shared prefix blocks back while it waits
            seq.computed = 0
            return None
        self.blocks.grow(seq.seq_id, seq.computed + new)
        return Work(seq, seq.computed, new)

    def _make_room(self, seq, tokens: int, busy: frozenset | set = frozenset()) -> bool:
        """Grow ``seq`` to ``tokens``, preempting younger sequences (not in flight) if needed; False if
        ``seq`` itself had to go (it was the youngest). Running sequences are scheduled oldest first, so a
        victim is never one already in this step's work."""
        while not self.blocks.can_grow(seq.seq_id, tokens):
            victim = max((s for s in self.running if s not in busy), key=lambda s: s.seq_id)
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.seq_id, tokens)
        return True

    def _preempt(self, seq) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1
