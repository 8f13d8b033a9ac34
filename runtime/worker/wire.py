"""How rank 0 tells the other ranks what to run: each ``Step`` as one compact int64 message.

Pickling the whole ``Step`` every step sent every sequence's full block table again, though a
decoding sequence's table changes only when it takes a new block (once per ``block_size`` tokens).
So both sides keep the tables of the previous step's sequences, and a message carries, per sequence,
how many leading blocks of its previous table still hold (``keep``) and only the blocks after them:

    header  [VERSION, kind, all_logits, B, T, N]            kind: STEP, or STOP (no more steps)
    seqs    B x [seq_id, new, context, tail, keep, sent]    table = previous[:keep] + the next ``sent`` blocks
    tokens  T                                               the step's input ids, packed
    blocks  N                                               every sequence's ``sent`` blocks, in order

A sequence seen for the first time (or whose table was replaced: preempted and re-admitted) has
``keep = 0`` and sends its whole table, so prompt-logits and first steps take the same path. Tables of
sequences absent from a step are forgotten on every rank (a sequence skipped for a step is sent whole
when it returns), so what the ranks keep is bounded by the batch.
"""
from __future__ import annotations

import torch

from runtime.kv.batch import SeqSlice, StepBatch
from runtime.worker.runner import Step

VERSION = 2  # bump when the layout changes: every rank runs the same code, but a mismatch must not pass silently
STEP, STOP = 1, 0
_HEADER, _PER_SEQ = 6, 6


class StepEncoder:
    """Rank 0's side: turns a Step into a message, remembering the tables the other ranks now hold."""

    def __init__(self):
        self._tables: dict[int, tuple[int, ...]] = {}

    def encode(self, step: Step | None) -> torch.Tensor:
        if step is None:
            self._tables = {}
            return torch.tensor([VERSION, STOP, 0, 0, 0, 0])
        seqs, meta, blocks = step.batch.seqs, [], []
        for s in seqs:
            prev = self._tables.get(s.seq_id)
            keep = _kept(prev, s.blocks)
            meta += (s.seq_id, s.new, s.context, s.tail, keep, len(s.blocks) - keep)
            if keep < len(s.blocks):
                blocks += s.blocks[keep:]
        self._tables = {s.seq_id: s.blocks for s in seqs}
        header = [VERSION, STEP, int(step.all_logits), len(seqs), len(step.tokens), len(blocks)]
        return torch.tensor(header + meta + list(step.tokens) + blocks, dtype=torch.int64)


class StepDecoder:
    """Another rank's side: rebuilds rank 0's Step (None for STOP) from a message."""

    def __init__(self):
        self._tables: dict[int, tuple[int, ...]] = {}

    def decode(self, message: torch.Tensor) -> Step | None:
        values = message.tolist()
        version, kind, all_logits, b, t, n = values[:_HEADER]
        if version != VERSION:
            raise RuntimeError(f"internal: step message version {version}, this rank speaks {VERSION}")
        if kind == STOP:
            self._tables = {}
            return None
        at, tables, seqs = _HEADER + _PER_SEQ * b + t, self._tables, []
        for i in range(_HEADER, _HEADER + _PER_SEQ * b, _PER_SEQ):
            seq_id, new, context, tail, keep, sent = values[i:i + _PER_SEQ]
            table = tables[seq_id] if keep else ()
            if keep < len(table):
                table = table[:keep]
            if sent:
                table = table + tuple(values[at:at + sent])
                at += sent
            seqs.append(SeqSlice(seq_id, new, context, table, tail))
        assert at == len(values) and at - n == _HEADER + _PER_SEQ * b + t, "internal: step message and header disagree"
        self._tables = {s.seq_id: s.blocks for s in seqs}
        tokens = values[_HEADER + _PER_SEQ * b:_HEADER + _PER_SEQ * b + t]
        return Step(tokens, StepBatch(tuple(seqs)), bool(all_logits))


def rows(message: torch.Tensor) -> tuple[int, int]:
    """(tokens in the step, rows of logits it returns) read from a message's header; (0, 0) for STOP."""
    _, kind, all_logits, b, t, _ = message[:_HEADER].tolist()
    return (0, 0) if kind == STOP else (t, t if all_logits else b)


def _kept(prev: tuple[int, ...] | None, blocks: tuple[int, ...]) -> int:
    """How many leading blocks of ``prev`` (the table the other ranks hold) ``blocks`` still starts with,
    all or nothing: tables grow by appending, or are replaced whole."""
    if prev is None:
        return 0
    if prev is blocks:  # unchanged since the last step (the block manager hands out the same tuple)
        return len(prev)
    n = len(prev)
    return n if n <= len(blocks) and blocks[:n] == prev else 0
